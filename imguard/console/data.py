"""Read-only data access for the console. Nothing here writes to what the gateway owns.

- Alerts: the gateway's `alerts.jsonl` (and its rotations `.1` .. `.N`) is the source of truth; the console keeps
  its own index of the alerts in it, DATA_DIR/console/alerts-index.sqlite3 (0600), filled by reading the file
  forward from the offset it reached (`AlertIndex.refresh`, before every page). A rotation is noticed by the
  inode: the rest of the rotated file is read first. Re-reading is harmless: `event.id` is unique.
  Index plan: alerts(time), alerts(sha256), alerts(protocol, time), alerts(direction, time),
  alert_rules(rule_id, time, alert), alert_people(person, time, alert): every filter of the Alerts page reads
  its alerts newest first from an index (a rule or person filter from its table), then LIMIT; nothing is sorted.
- Conversations: the archive (DATA_DIR/archive.sqlite3 opened read-only, `mode=ro`; or the PostgreSQL archive
  in a read-only transaction). The archive's own indexes serve time ranges and sha256; a person or text search
  is a substring match (LIKE), as `imguard archive search` does; on SQLite the console keeps its own search index of
  the archive (DATA_DIR/console/archive-search.sqlite3, `ArchiveReader` below: made by a thread, searches never wait
  for it) that finds the candidates; on PostgreSQL the archive's own pg_trgm indexes do (imguard/archive.py).
  Deep pages go by cursor (keyset on (time, id)), not OFFSET: the alert list and the archive search.
- Quarantine: the sidecars of DATA_DIR/quarantine, through `imguard.quarantine.QuarantineStore`.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from datetime import datetime
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

import orjson

from imguard import archive

log = logging.getLogger(__name__)

_INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY,
    event_id TEXT UNIQUE NOT NULL,
    time TEXT NOT NULL,             -- @timestamp, ISO 8601 UTC
    dataset TEXT, action TEXT, severity INTEGER, severity_name TEXT,
    protocol TEXT, direction TEXT, sender TEXT, recipients TEXT, conversation TEXT,
    sha256 TEXT, file_name TEXT, summary TEXT,
    rules TEXT,                     -- the rule ids, space-separated (shown in lists; filtered via alert_rules)
    event TEXT NOT NULL             -- the whole event, JSON
);
CREATE INDEX IF NOT EXISTS alerts_time ON alerts(time);
CREATE INDEX IF NOT EXISTS alerts_sha256 ON alerts(sha256) WHERE sha256 IS NOT NULL;
-- A filter on protocol or direction reads its alerts newest first from these (the rows are large: a scan of
-- them to find one protocol's page cost seconds on 1,000,000 alerts).
CREATE INDEX IF NOT EXISTS alerts_protocol ON alerts(protocol, time);
CREATE INDEX IF NOT EXISTS alerts_direction ON alerts(direction, time);
-- With the alert's time: a rule's or a person's alerts are read newest first, a page at a time, not sorted.
CREATE TABLE IF NOT EXISTS alert_rules (rule_id TEXT NOT NULL, time TEXT NOT NULL, alert INTEGER NOT NULL,
                                        PRIMARY KEY (rule_id, time, alert)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alert_people (person TEXT NOT NULL, time TEXT NOT NULL, alert INTEGER NOT NULL,
                                         PRIMARY KEY (person, time, alert)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS source (name TEXT PRIMARY KEY, inode INTEGER, offset INTEGER);
-- The Overview's counts, kept per hour as alerts are indexed: a page sums a few hundred rows instead of
-- grouping every alert. dimension: all, rule, protocol, direction, action, blocked_sender.
CREATE TABLE IF NOT EXISTS alert_counts (dimension TEXT NOT NULL, value TEXT NOT NULL, hour TEXT NOT NULL,
                                         n INTEGER NOT NULL, PRIMARY KEY (dimension, value, hour)) WITHOUT ROWID;
"""
# An index of another layout is rebuilt from alerts.jsonl (it holds nothing the file does not).
_INDEX_VERSION = 4

SEVERITIES = ("info", "low", "medium", "high", "critical")


def _get(event: dict, *path: str, default: Any = None) -> Any:
    for key in path:
        if not isinstance(event, dict) or key not in event:
            return default
        event = event[key]
    return event


def _as_list(value: Any) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def bare(person: str) -> str:
    """A person as the other side names them: without a device part (an XMPP resource: `bob@localhost/b` ->
    `bob@localhost`) or an IRC user's mask (`bob!b@host` -> `bob`, as a PRIVMSG to bob names bob)."""
    if "!" in person and not person.startswith(("#", "&")):
        return person.split("!", 1)[0]
    return person.split("/", 1)[0] if "@" in person.split("/", 1)[0] else person


def people_of(event: dict) -> set[str]:
    context = _get(event, "imguard", "context", default={}) or {}
    names = {context.get("sender") or _get(event, "source", "user", "name") or ""}
    names.update(_as_list(context.get("recipients")) or _as_list(_get(event, "destination", "user", "name")))
    names.discard("")
    return names | {bare(n) for n in names}


@dataclass
class AlertFilter:
    since: str = ""
    until: str = ""
    severity: str = ""          # at least this severity (a word of SEVERITIES)
    rule: str = ""
    protocol: str = ""
    direction: str = ""
    person: str = ""            # exact, with or without a device part
    sha256: str = ""
    page: int = 1               # without a cursor: the page'th page (OFFSET); with one, only shown
    per_page: int = 50
    before: tuple[str, int] | None = None   # keyset: the alerts older than this (time, row) (the next page)
    after: tuple[str, int] | None = None    # keyset: the alerts newer than this one (the previous page)


@dataclass
class AlertPage:
    rows: list[dict]
    page: int
    per_page: int
    has_next: bool
    older: tuple[str, int] | None = None    # where the next (older) page starts; None on the last page
    newer: tuple[str, int] | None = None    # where the previous (newer) page ends; None on the first page


@dataclass
class Overview:
    total: int
    by_rule: list[tuple[str, int]]
    by_protocol: list[tuple[str, int]]
    by_direction: list[tuple[str, int]]
    by_action: list[tuple[str, int]]
    top_senders: list[tuple[str, int]]
    over_time: list[tuple[str, int]] = field(default_factory=list)


def _alert_cursor(row: dict) -> tuple[str, int]:
    return (row["time"], row["id"])


class AlertIndex:
    """The console's index of the alerts in DATA_DIR/alerts.jsonl (only `event.kind` = `alert`)."""

    def __init__(self, data_dir: Path, index_path: Path):
        self.alerts_file = Path(data_dir) / "alerts.jsonl"
        index_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not index_path.exists():
            os.close(os.open(index_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._db = sqlite3.connect(index_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        if self._db.execute("PRAGMA user_version").fetchone()[0] != _INDEX_VERSION:
            for (table,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                self._db.execute(f'DROP TABLE "{table}"')
            self._db.execute(f"PRAGMA user_version = {_INDEX_VERSION}")
        self._db.executescript(_INDEX_SCHEMA)
        self._lock = threading.Lock()
        self.skipped_lines = 0          # alert lines that were not JSON objects: counted, never a crash

    # --- filling ----------------------------------------------------------------------------------

    def refresh(self) -> int:
        """Index what was appended since the last call; returns how many alerts were added."""
        with self._lock:
            row = self._db.execute("SELECT inode, offset FROM source WHERE name = 'alerts'").fetchone()
            inode, offset = row if row else (None, 0)
            try:
                st = os.stat(self.alerts_file)
            except FileNotFoundError:
                return 0
            added = 0
            if inode is not None and inode != st.st_ino:
                # Rotated: finish the file we were reading (now alerts.jsonl.1), then start the new one.
                rotated = self.alerts_file.with_name(self.alerts_file.name + ".1")
                try:
                    if os.stat(rotated).st_ino == inode:
                        added += self._read_from(rotated, offset)[0]
                except FileNotFoundError:
                    pass
                offset = 0
            elif offset > st.st_size:       # truncated in place
                offset = 0
            count, new_offset = self._read_from(self.alerts_file, offset)
            if (st.st_ino, new_offset) != (inode, offset) or row is None:
                self._db.execute("INSERT OR REPLACE INTO source VALUES ('alerts', ?, ?)", (st.st_ino, new_offset))
            return added + count

    def _read_from(self, path: Path, offset: int) -> tuple[int, int]:
        added = 0
        with open(path, "rb") as f:
            f.seek(offset)
            while True:
                chunk = f.readlines(4 * 1024 * 1024)
                if not chunk:
                    break
                rows = []
                for line in chunk:
                    if not line.endswith(b"\n"):
                        break                   # a line being written: read it next time
                    offset += len(line)
                    if b'"alert"' not in line:
                        continue            # not an alert (`event.kind` is "event"): no need to parse it
                    event = self._parse(line)
                    if event is not None and _get(event, "event", "kind") == "alert":
                        rows.append((event, line))
                added += self._insert(rows)
                if chunk and not chunk[-1].endswith(b"\n"):
                    break
        return added, offset

    def _parse(self, line: bytes) -> dict | None:
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            self.skipped_lines += 1
            return None
        if not isinstance(event, dict) or not isinstance(event.get("event"), dict):
            self.skipped_lines += 1
            return None
        return event

    def _insert(self, events: list[tuple[dict, bytes]]) -> int:
        added = 0
        self._db.execute("BEGIN")
        try:
            for event, line in events:
                context = _get(event, "imguard", "context", default={}) or {}
                recipients = _as_list(context.get("recipients"))
                severity = _get(event, "event", "severity")
                rules = sorted({str(r) for r in _as_list(_get(event, "rule", "id"))})
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO alerts (event_id, time, dataset, action, severity, severity_name, "
                    "protocol, direction, sender, recipients, conversation, sha256, file_name, summary, rules, "
                    "event) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (str(_get(event, "event", "id") or ""), str(event.get("@timestamp") or ""),
                     _get(event, "event", "dataset"), _get(event, "event", "action"),
                     severity if isinstance(severity, int) else None,
                     # event.severity_name: the name before the ECS renaming (docs/events.md, "Changes")
                     _get(event, "imguard", "severity") or _get(event, "event", "severity_name"),
                     _get(event, "network", "protocol") or context.get("protocol"),
                     _get(event, "network", "direction") or context.get("direction"),
                     context.get("sender") or _get(event, "source", "user", "name"),
                     " ".join(map(str, recipients)), context.get("conversation"),
                     _get(event, "file", "hash", "sha256"), _get(event, "file", "name"),
                     event.get("message"), " ".join(rules), line.decode("utf-8", "replace")))
                if cursor.rowcount != 1:
                    continue
                added += 1
                alert, when = cursor.lastrowid, str(event.get("@timestamp") or "")
                self._db.executemany("INSERT OR IGNORE INTO alert_rules VALUES (?, ?, ?)",
                                     [(r, when, alert) for r in rules])
                self._db.executemany("INSERT OR IGNORE INTO alert_people VALUES (?, ?, ?)",
                                     [(p, when, alert) for p in sorted(people_of(event))])
                self._count(event, context, rules)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return added

    def _count(self, event: dict, context: dict, rules: list[str]) -> None:
        hour = str(event.get("@timestamp") or "")[:13]
        action = _get(event, "event", "action") or ""
        values = [("all", ""), ("protocol", _get(event, "network", "protocol") or context.get("protocol") or ""),
                  ("direction", _get(event, "network", "direction") or context.get("direction") or ""),
                  ("action", action)] + [("rule", r) for r in rules]
        sender = context.get("sender") or _get(event, "source", "user", "name")
        if action in ("block", "quarantine") and sender:
            values.append(("blocked_sender", str(sender)))
        self._db.executemany("INSERT INTO alert_counts VALUES (?, ?, ?, 1) ON CONFLICT DO UPDATE SET n = n + 1",
                             [(d, str(v), hour) for d, v in values])

    # --- reading ----------------------------------------------------------------------------------

    def _where(self, f: AlertFilter, driver: str = "") -> tuple[str, list[Any]]:
        """The conditions of `f`; with `driver` (alert_rules, alert_people: `d`), its rule or person and the time
        range are conditions on `d`, whose key is (rule or person, time, alert)."""
        where, args = [], []
        time = "d.time" if driver else "a.time"
        if f.since:
            where.append(f"{time} >= ?")
            args.append(f.since)
        if f.until:
            where.append(f"{time} < ?")
            args.append(f.until)
        if f.severity in SEVERITIES:
            where.append("a.severity >= ?")
            args.append(SEVERITIES.index(f.severity) + 1)
        for table, column, value in (("alert_rules", "rule_id", f.rule), ("alert_people", "person", f.person)):
            if value:
                where.append(f"d.{column} = ?" if table == driver else
                             f"a.id IN (SELECT alert FROM {table} WHERE {column} = ?)")
                args.append(value)
        for column, value in (("protocol", f.protocol), ("direction", f.direction)):
            if value:
                where.append(f"a.{column} = ?")
                args.append(value)
        if f.sha256:
            where.append("a.sha256 = ?")
            args.append(f.sha256.lower())
        return (" WHERE " + " AND ".join(where)) if where else "", args

    def alerts(self, f: AlertFilter) -> AlertPage:
        # A rule's or a person's alerts are read from alert_rules or alert_people, newest first (`d`).
        driver = "alert_rules" if f.rule else "alert_people" if f.person else ""
        where, args = self._where(f, driver)
        page = max(1, f.page)
        time, row = ("d.time", "d.alert") if driver else ("a.time", "a.id")
        source = f"{driver} d JOIN alerts a ON a.id = d.alert" if driver else "alerts a"
        newer = f.after is not None and f.before is None
        order = f"{time}, {row}" if newer else f"{time} DESC, {row} DESC"
        cursor = f.before or f.after
        if cursor:      # keyset: from the cursor's place in the index the filter reads (a range on time), no OFFSET
            op = ">" if newer else "<"
            where += (" AND " if where else " WHERE ") + f"{time} {op}= ? AND ({time} {op} ? OR {row} {op} ?)"
            args += [cursor[0], cursor[0], cursor[1]]
        sql = (f"SELECT a.id, a.event_id, a.time, a.dataset, a.action, a.severity_name, a.protocol, a.direction, "
               f"a.sender, a.recipients, a.sha256, a.file_name, a.summary, a.rules "
               f"FROM {source}{where} ORDER BY {order} LIMIT ?" + ("" if cursor else " OFFSET ?"))
        args.append(f.per_page + 1)
        if not cursor:
            args.append((page - 1) * f.per_page)
        names = ("id", "event_id", "time", "dataset", "action", "severity", "protocol", "direction", "sender",
                 "recipients", "sha256", "file_name", "summary", "rules")
        with self._lock:
            rows = [dict(zip(names, r, strict=True)) for r in self._db.execute(sql, args).fetchall()]
        more = len(rows) > f.per_page
        if newer:
            rows = rows[:f.per_page][::-1]
            return AlertPage(rows, page, f.per_page, bool(rows), _alert_cursor(rows[-1]) if rows else None,
                             _alert_cursor(rows[0]) if rows and more else None)
        rows = rows[:f.per_page]
        return AlertPage(rows, page, f.per_page, more, _alert_cursor(rows[-1]) if rows and more else None,
                         _alert_cursor(rows[0]) if rows and (f.before or page > 1) else None)

    def alert(self, event_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT event FROM alerts WHERE event_id = ?", (event_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def choices(self) -> dict[str, list[str]]:
        """The values the filters offer: rules, protocols, directions seen."""
        # From the per-hour counts: a DISTINCT over the alerts read every one of them on every page.
        def seen(dimension: str) -> list[str]:
            return [v for (v,) in self._db.execute(
                "SELECT DISTINCT value FROM alert_counts WHERE dimension = ? AND value != '' ORDER BY 1",
                (dimension,))]
        with self._lock:
            return {"rules": seen("rule"), "protocols": seen("protocol"), "directions": seen("direction")}

    def overview(self, since: str = "", bucket: int = 13) -> Overview:
        """Counts from the hour `since` on; alerts over time per hour (`bucket` 13: 'YYYY-MM-DDTHH') or per day
        (10: 'YYYY-MM-DD'). Read from the per-hour counts, not from the alerts."""
        def top(dimension: str, limit: int = 20) -> list[tuple[str, int]]:
            return [(k or "(none)", n) for k, n in self._db.execute(
                "SELECT value, sum(n) FROM alert_counts WHERE dimension = ? AND hour >= ? GROUP BY 1 "
                "ORDER BY 2 DESC, 1 LIMIT ?", (dimension, since, limit))]
        with self._lock:
            total = self._db.execute("SELECT coalesce(sum(n), 0) FROM alert_counts WHERE dimension = 'all' "
                                     "AND hour >= ?", (since,)).fetchone()[0]
            over_time = list(self._db.execute(
                f"SELECT substr(hour, 1, {int(bucket)}), sum(n) FROM alert_counts WHERE dimension = 'all' "
                f"AND hour >= ? GROUP BY 1 ORDER BY 1", (since,)))
            return Overview(total, top("rule"), top("protocol"), top("direction"), top("action"),
                            top("blocked_sender", 10), over_time)

    # --- for the review queue and the retro-hunt page (review.py, views.py) ---------------------------------

    def flagged_for_review(self, after: int = 0) -> tuple[list[dict], int]:
        """The alerts indexed after row `after` that a `review: true` rule flagged (`imguard.review`), oldest
        first, and the last row looked at (the next call's `after`): each row is read once per console process."""
        with self._lock:
            top = self._db.execute("SELECT coalesce(max(id), 0) FROM alerts").fetchone()[0]
            rows = self._db.execute("SELECT event FROM alerts WHERE id > ? AND id <= ? AND "
                                    "instr(event, '\"review\"') > 0 ORDER BY id", (after, top)).fetchall()
        events = [json.loads(r[0]) for r in rows]
        return [e for e in events if isinstance(_get(e, "imguard", "review"), dict)], max(top, after)

    def by_action(self, action: str, limit: int = 200) -> list[dict]:
        """The newest alerts whose `event.action` is `action` (the retro-hunt page): rare, so no index of its own;
        the rows are found by a scan of the action column."""
        with self._lock:
            rows = self._db.execute("SELECT event FROM alerts WHERE action = ? ORDER BY time DESC LIMIT ?",
                                    (action, limit)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --- the archive -------------------------------------------------------------------------------------

# The console's search index of a SQLite archive. A person or text search is a substring match (LIKE '%x%'), which
# no B-tree index serves: on 1,000,000 records a search that finds little read them all (bench/bench_console.py).
# An FTS5 index with the trigram tokenizer (SQLite >= 3.34) finds the records that hold every 3-character piece of
# a term; the LIKE conditions still decide, so the results are those of the scan (a term of fewer than 3 characters
# is a scan). Kept by the console, not the archive: indexing a record costs the writer ~45 us of CPU, several times
# what storing it does, and the gateway's writer is not to pay for the console. Contentless (the index holds no
# text, only which record has which trigram), in DATA_DIR/console/archive-search.sqlite3 (0600, WAL). A thread of
# the console's (`start_indexing`) brings it up to date by record id, a batch per transaction, on its own
# connection; a search never writes it: it reads the index as of its last batch, and the records after it without.
# (A PostgreSQL archive has its own pg_trgm indexes: imguard/archive.py PG_SEARCH_SCHEMA.)
_SEARCH_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS search.records_search USING fts5(sender, recipients, text, file_name, content='',
                                                                    tokenize='trigram');
-- A conversation's two people: each record under the people its sender ('s') and recipients ('r') name as
-- ArchiveReader._person matches them (the whole value and each part before a '/' or '!'), ASCII lower-cased as
-- SQLite's LIKE compares; a trigram search for an address is slow (every address shares the domain's trigrams).
CREATE TABLE IF NOT EXISTS search.people (side TEXT NOT NULL, key TEXT NOT NULL, id INTEGER NOT NULL,
                                          PRIMARY KEY (side, key, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS search.indexed (last_id INTEGER NOT NULL, uid TEXT, time TEXT);
"""
SEARCH_INDEX_BATCH = 20_000         # records per transaction of the indexing thread (~3 s on a busy core)
SEARCH_INDEX_LAG = 50_000           # records the index may be behind and still be used (those are read by id)
SEARCH_INDEX_POLL = 2.0             # seconds between the indexing thread's looks for new records
SCAN_STEPS = 1_000_000              # a search's scan before it asks the index: ~8 steps a record (~125,000 records)
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class IndexState(Enum):
    """Where the console's search index of the archive stands, as a search page says it."""
    READY = "ready"             # up to date within SEARCH_INDEX_LAG records: searches use it
    BUILDING = "building"       # further behind (being made): searches read the records without it
    NONE = "none"               # no such index: a PostgreSQL archive (its own indexes serve), no archive, or a
                                # console folder it cannot write (searches scan)


@dataclass(frozen=True)
class IndexProgress:
    state: IndexState
    indexed: int = 0            # the highest record id in the index
    total: int = 0              # the highest record id in the archive


def _person_key(person: str) -> str:
    return bare(person).translate(_ASCII_LOWER)


def _person_keys(value: str | None) -> set[str]:
    """The keys a conversation's person `p` (bare) finds this value under: `value = p`, or `value LIKE 'p/%'` or
    `'p!%'` (ASCII case-insensitive)."""
    if not value:
        return set()
    value = value.translate(_ASCII_LOWER)
    return {value} | {value[:i] for i, c in enumerate(value) if c in "/!"}


def search_match(terms: Iterable[tuple[tuple[str, ...], str]]) -> str:
    """The records_search MATCH expression that finds every record where one of the columns holds the term, for
    each (columns, term) with a term of 3 characters or more; '' when none has."""
    quote_ = '"'
    return " AND ".join("{%s} : %s%s%s" % (" ".join(columns), quote_, term.replace(quote_, quote_ * 2), quote_)
                        for columns, term in terms if len(term) >= 3)


Cursor = tuple[str, int]        # a record's (time, id): where a page of records newest first starts or ends


def cursor_of(record: dict[str, Any]) -> Cursor:
    return (str(record["time"]), int(record["id"]))


@dataclass
class RecordQuery:
    person: str = ""            # sender or recipient contains this
    text: str = ""              # message text or file name contains this
    since: str = ""
    until: str = ""
    protocol: str = ""
    sha256: str = ""
    page: int = 1               # without a cursor: the page'th page (OFFSET); with one, only shown
    per_page: int = 100
    before: Cursor | None = None    # keyset: the records older than this one (the next page)
    after: Cursor | None = None     # keyset: the records newer than this one (the previous page)


@dataclass
class RecordPage:
    rows: list[dict[str, Any]]
    older: Cursor | None        # where the next (older) page starts; None on the last page
    newer: Cursor | None        # where the previous (newer) page ends; None on the first page


class ArchiveReader:
    """Read-only queries on the archive: SQLite (opened `mode=ro`) or PostgreSQL (read-only transactions)."""

    def __init__(self, path: Path | None = None, dsn: str = "", index_path: Path | None = None):
        self.path, self.dsn = path, dsn
        self._lock = threading.Lock()
        self._db: Any = None
        # The console's search index of a SQLite archive (see _SEARCH_SCHEMA), used when `search_index` (the
        # benchmark compares without) and `index_ready`: None until the archive is opened, False when there is none
        # (a folder the console cannot write: searches then scan). PostgreSQL: none.
        self.search_index = not dsn
        self.index_ready: bool | None = None
        self.scan_steps = SCAN_STEPS
        self.index_lag = SEARCH_INDEX_LAG
        self.index_path = index_path or (Path(path).parent / "console" / "archive-search.sqlite3" if path else None)
        self._attach_lock = threading.Lock()
        self._build_lock = threading.Lock()     # the indexing connection: the thread's, or update_index()'s caller
        self._builder_db: sqlite3.Connection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if dsn:
            import psycopg
            self._db = psycopg.connect(dsn, autocommit=True)
            self._db.execute("SET default_transaction_read_only = on")
            self._like, self._mark = "ILIKE", "%s"
        else:
            self._like, self._mark = "LIKE", "?"

    def _connection(self):
        if self._db is None and not self.dsn:
            if self.path is None or not Path(self.path).exists():
                return None
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            self.index_ready = self._attach_index(self._db)
        return self._db

    def _attach_index(self, db: sqlite3.Connection) -> bool:
        try:
            with self._attach_lock:
                folder = Path(self.index_path).parent
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                if not Path(self.index_path).exists():
                    os.close(os.open(self.index_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                db.execute("ATTACH DATABASE ? AS search", (f"file:{quote(str(self.index_path))}",))
                # WAL: the searches read the index while the indexing thread writes a batch
                db.execute("PRAGMA search.journal_mode=WAL")
                db.executescript(_SEARCH_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            log.warning("console: no search index of the archive (%s); person and text searches read every record", e)
            return False
        return True

    # --- the search index: made by a thread, read by the searches -------------------------------------------------

    def start_indexing(self) -> None:
        """Start the thread that keeps the search index up to date (a SQLite archive; no-op otherwise). The first
        search need not wait for it: until the index has caught up, searches read the records without it."""
        if self.dsn or self._thread is not None or not self.search_index:
            return
        self._thread = threading.Thread(target=self._index_loop, name="console-search-index", daemon=True)
        self._thread.start()

    def _index_loop(self) -> None:
        pause = SEARCH_INDEX_POLL
        while not self._stop.is_set():
            try:
                self.update_index()
                pause = SEARCH_INDEX_POLL
            except (OSError, sqlite3.Error) as e:   # the archive gone or locked: said once a minute at most
                if pause < 60:
                    log.warning("console: the search index of the archive is not updated (%s)", e)
                pause = min(60.0, pause * 2)
            self._stop.wait(pause)

    def update_index(self) -> int | None:
        """Index the records added since the last call, a batch per transaction (the indexing thread calls it;
        the tests and the benchmark too): the highest id indexed, None when there is no index to keep."""
        with self._build_lock:
            if self._builder_db is None:
                if self.path is None or not Path(self.path).exists():
                    return None
                db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
                if not self._attach_index(db):
                    db.close()
                    return None
                db.execute("PRAGMA search.synchronous=NORMAL")
                self._builder_db = db
            return self._refresh_index(self._builder_db)

    def _refresh_index(self, db: sqlite3.Connection) -> int:
        """Index the records added since the last call; the highest id indexed. Ids grow as records are added; a
        record removed at the end may have its id given again, so when the last record indexed is no longer the
        one it was (uid and time), the index is made again (searches scan meanwhile)."""
        row = db.execute("SELECT last_id, uid, time FROM search.indexed").fetchone()
        last, known = (row[0], row[1:]) if row else (0, None)
        if last and db.execute("SELECT uid, time FROM records WHERE id = ?", (last,)).fetchone() != known:
            db.execute("INSERT INTO search.records_search(records_search) VALUES ('delete-all')")
            db.execute("DELETE FROM search.people")
            db.execute("DELETE FROM search.indexed")
            db.commit()
            last = 0
        top = db.execute("SELECT max(id) FROM records").fetchone()[0] or 0
        while last < top and not self._stop.is_set():
            upto = min(last + SEARCH_INDEX_BATCH, top)
            db.execute("INSERT INTO search.records_search(rowid, sender, recipients, text, file_name) SELECT id, "
                       "sender, recipients, text, file_name FROM records WHERE id > ? AND id <= ?", (last, upto))
            db.executemany("INSERT OR IGNORE INTO search.people VALUES (?, ?, ?)", (
                (side, key, record) for record, sender, recipients in db.execute(
                    "SELECT id, sender, recipients FROM records WHERE id > ? AND id <= ?", (last, upto)).fetchall()
                for side, value in (("s", sender), ("r", recipients)) for key in _person_keys(value)))
            db.execute("DELETE FROM search.indexed")
            db.execute("INSERT INTO search.indexed SELECT id, uid, time FROM records WHERE id <= ? "
                       "ORDER BY id DESC LIMIT 1", (upto,))
            db.commit()
            last = upto
        return last

    def _index_last(self, db: sqlite3.Connection) -> int | None:
        """Inside a search's read transaction: the highest record id the index holds, when the search is to use
        it (the records after it are read by id); None when it is not (none, off, or too far behind)."""
        if not (self.search_index and self.index_ready):
            return None
        row = db.execute("SELECT last_id, uid, time FROM search.indexed").fetchone()
        last = row[0] if row else 0
        if last and db.execute("SELECT uid, time FROM records WHERE id = ?", (last,)).fetchone() != row[1:]:
            return None                 # its last record removed (its id may be given again): to be made again
        top = db.execute("SELECT max(id) FROM records").fetchone()[0] or 0
        return last if top - last <= self.index_lag else None

    def index_progress(self) -> IndexProgress:
        """For the search page: whether its searches use the index, and how far it is."""
        if self.dsn or not self.search_index:
            return IndexProgress(IndexState.NONE)
        with self._lock:
            db = self._connection()
            if db is None or not self.index_ready:
                return IndexProgress(IndexState.NONE)
            row = db.execute("SELECT last_id FROM search.indexed").fetchone()
            last, top = row[0] if row else 0, db.execute("SELECT max(id) FROM records").fetchone()[0] or 0
        return IndexProgress(IndexState.READY if top - last <= self.index_lag else IndexState.BUILDING, last, top)

    # --- queries ------------------------------------------------------------------------------------------------

    def _rows(self, db: Any, sql: str, args: list[Any], steps: int = 0) -> list[dict[str, Any]] | None:
        """`sql` run; with `steps` (SQLite), for at most that many steps of SQLite's machine (about 125,000 records
        scanned for SCAN_STEPS): None when it needed more."""
        if steps:
            db.set_progress_handler(lambda: 1, steps)
        try:
            rows = db.execute(sql, args).fetchall()
        except sqlite3.OperationalError as e:
            if not steps or "interrupt" not in str(e):
                raise
            return None
        finally:
            if steps:
                db.set_progress_handler(None, 0)
        return [dict(zip(archive.COLUMNS, row, strict=True)) for row in rows]

    def _run(self, sql: str, args: list[Any]) -> list[dict[str, Any]]:
        with self._lock:
            db = self._connection()
            if db is None:
                return []
            return self._rows(db, sql, args)

    def _person(self, column: str, person: str, args: list[Any]) -> str:
        """`column` names `person` (`bare`), with or without a device part or an IRC mask."""
        person = bare(person)
        args += [person, archive._escape_like(person) + "/%", archive._escape_like(person) + "!%"]
        m = self._mark
        return f"({column} = {m} OR {column} LIKE {m} ESCAPE '\\' OR {column} LIKE {m} ESCAPE '\\')"

    def _keyset(self, cursor: Cursor, older: bool, args: list[Any]) -> str:
        """The records older (newer) than `cursor` in the order (time, id). SQLite: `time <= t` is the range its
        time index (time, rowid) walks from the cursor; PostgreSQL compares the row with its (time, id) index."""
        when, ident = cursor
        m, op = self._mark, "<" if older else ">"
        if self.dsn:
            args += [when, ident]
            return f"(time, id) {op} ({m}, {m})"
        args += [when, when, ident]
        return f"time {op}= {m} AND (time {op} {m} OR id {op} {m})"

    def search_sql(self, q: RecordQuery, *narrow: str) -> tuple[str, list[Any]]:
        """The SELECT of `q`'s page (newest first; with `q.after`, oldest first, to be reversed), at most
        `q.per_page` + 1 records; `narrow` are conditions added (with their arguments last, before the page's)."""
        where, args = [], []
        m, like = self._mark, self._like
        if q.person:
            where.append(f"(sender {like} {m} ESCAPE '\\' OR recipients {like} {m} ESCAPE '\\')")
            args += [f"%{archive._escape_like(q.person)}%"] * 2
        if q.text:
            where.append(f"(text {like} {m} ESCAPE '\\' OR file_name {like} {m} ESCAPE '\\')")
            args += [f"%{archive._escape_like(q.text)}%"] * 2
        for clause, value in ((f"time >= {m}", q.since), (f"time < {m}", q.until), (f"protocol = {m}", q.protocol),
                              (f"sha256 = {m}", q.sha256.lower())):
            if value:
                where.append(clause)
                args.append(value)
        cursor = q.before or q.after
        if cursor:
            where.append(self._keyset(cursor, q.after is None, args))
        order = "time, id" if q.after and not q.before else "time DESC, id DESC"
        conditions = [*where, *narrow]
        sql = (f"SELECT {', '.join(archive.COLUMNS)} FROM records"
               + (" WHERE " + " AND ".join(conditions) if conditions else "") + f" ORDER BY {order} LIMIT {m}")
        args.append(q.per_page + 1)
        if not cursor:
            sql += f" OFFSET {m}"
            args.append((max(1, q.page) - 1) * q.per_page)
        return sql, args

    def search(self, q: RecordQuery) -> list[dict[str, Any]]:
        """A page of the matching records, newest first: at most `q.per_page` + 1 records (an extra one means
        there is a further page: an older one, or with `q.after` a newer one, first in the list). The page is the
        one after a cursor (keyset: as quick deep in the results as on their first page) or `q.page` (OFFSET).
        A person or text search first scans from the page's start for a bounded time (a common term fills a page
        at once there, while the index would gather every record holding it), then asks the index (a rare term)."""
        match = search_match(((("sender", "recipients"), q.person), (("text", "file_name"), q.text)))
        with self._lock:
            db = self._connection()
            if db is None:
                return []
            if self.dsn or not match:
                rows = self._rows(db, *self.search_sql(q))
            else:
                db.execute("BEGIN")         # one snapshot of the index and the archive
                try:
                    last = self._index_last(db)
                    if last is None:
                        rows = self._rows(db, *self.search_sql(q))
                    else:
                        rows = self._rows(db, *self.search_sql(q), steps=self.scan_steps)
                        if rows is None:
                            # One IN over the rowid (not an OR of them, which SQLite answers by walking the time
                            # index); the match and the id go between the conditions' and the page's arguments
                            sql, args = self.search_sql(q, "id IN (SELECT rowid FROM search.records_search WHERE "
                                                           "records_search MATCH ? UNION ALL SELECT id FROM records "
                                                           "WHERE id > ?)")
                            page_args = 1 if q.before or q.after else 2
                            args[-page_args:-page_args] = [match, last]
                            rows = self._rows(db, sql, args)
                finally:
                    if db.in_transaction:
                        db.execute("COMMIT")
        return rows[::-1] if q.after and not q.before else rows

    def search_page(self, q: RecordQuery) -> RecordPage:
        """`search` as a page with the cursors of its neighbours."""
        rows = self.search(q)
        if q.after and not q.before:
            more = len(rows) > q.per_page
            rows = rows[-q.per_page:] if rows else []
            return RecordPage(rows, cursor_of(rows[-1]) if rows else None,
                              cursor_of(rows[0]) if rows and more else None)
        more = len(rows) > q.per_page
        rows = rows[:q.per_page]
        return RecordPage(rows, cursor_of(rows[-1]) if rows and more else None,
                          cursor_of(rows[0]) if rows and (q.before or q.page > 1) else None)

    def conversation(self, protocol: str, a: str, b: str = "", room: str = "", since: str = "",
                     limit: int = 500) -> list[dict[str, Any]]:
        """Both sides in time order: the records between people `a` and `b` (with or without device parts), or
        the records of `room`, on `protocol`, from `since`."""
        m = self._mark
        args: list[Any] = []
        if room:
            where = f"conversation = {m}"
            args.append(room)
        else:
            ab = f"({self._person('sender', a, args)} AND {self._person('recipients', b, args)})"
            ba = f"({self._person('sender', b, args)} AND {self._person('recipients', a, args)})"
            where = f"({ab} OR {ba})"
        tail = ""
        if protocol:
            tail += f" AND protocol = {m}"
        if since:
            tail += f" AND time >= {m}"
        tail_args = [v for v in (protocol, since) if v] + [limit]
        with self._lock:
            db = self._connection()
            if db is None:
                return []
            if self.dsn or room:
                return self._rows(db, f"SELECT {', '.join(archive.COLUMNS)} FROM records WHERE {where}{tail} "
                                      f"ORDER BY time, id LIMIT {m}", [*args, *tail_args])
            db.execute("BEGIN")
            try:
                last = self._index_last(db)
                if last is not None:        # the records the index says are between them, and those it has not seen
                    pair = ("SELECT id FROM (SELECT id FROM search.people WHERE side = 's' AND key = ? INTERSECT "
                            "SELECT id FROM search.people WHERE side = 'r' AND key = ?)")
                    where += f" AND id IN ({pair} UNION ALL {pair} UNION ALL SELECT id FROM records WHERE id > ?)"
                    args += [_person_key(a), _person_key(b), _person_key(b), _person_key(a), last]
                return self._rows(db, f"SELECT {', '.join(archive.COLUMNS)} FROM records WHERE {where}{tail} "
                                      f"ORDER BY time, id LIMIT {m}", [*args, *tail_args])
            finally:
                if db.in_transaction:
                    db.execute("COMMIT")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._build_lock:
            if self._builder_db is not None:
                self._builder_db.close()
                self._builder_db = None
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db, self.index_ready = None, None
        self._stop.clear()


def merge_sides(records: Iterable[dict[str, Any]], window: float = 2.0) -> list[dict[str, Any]]:
    """One row per message or file as a person reads a conversation: when both parties are behind the gateway it
    recorded each item twice (outbound on the sender's connection, inbound on the receiver's); those records are
    one row here, with `seen` listing both directions and `actions` both verdicts."""
    merged: list[dict[str, Any]] = []
    for record in records:
        key = (record["kind"], bare(record["sender"] or ""), record["text"], record["sha256"], record["file_name"])
        when = _parse_time(record["time"])
        for previous in reversed(merged[-8:]):
            if previous["_key"] == key and when and previous["_when"] and \
                    abs((when - previous["_when"]).total_seconds()) <= window:
                previous["seen"].append(record["direction"] or "")
                previous["records"].append(record)
                break
        else:
            merged.append({**record, "_key": key, "_when": when, "seen": [record["direction"] or ""],
                           "records": [record]})
    return merged


def _parse_time(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat((value or "").replace("Z", "+00:00"))
    except ValueError:
        return None


def quarantine_entries(data_dir: Path) -> list[Any]:
    from imguard.quarantine import QuarantineStore

    folder = Path(data_dir) / "quarantine"
    return QuarantineStore(folder).entries() if folder.is_dir() else []
