"""The conversation archive: every message and file transfer that crossed (or was stopped), in SQLite
inside the data folder, or in PostgreSQL when several gateways share one archive (`archive_dsn`).

One table, one row per record, so a search by person, text, time, protocol or hash is one query.
Text is stored only when the pipeline is told to keep it.

add_message() is called inline on the gateway's event loop for every chat message, and a database
insert costs a transaction each (about 0.1-0.3 ms in SQLite, a network round trip in PostgreSQL, and
a PostgreSQL server can be slow or down). So the gateway's archive (`open_archive`) appends records
to a local on-disk queue (the sinks' DiskQueue, in DATA_DIR/queue/archive/) and a writer thread inserts
queued records in batches, one transaction each. Records are gathered and written to the queue by
commit(), one write for all of them: the gateway commits before it forwards anything (the records of a
read's stanzas are on disk before the first of them crosses, and survive a crash of the process from
then on); file records are committed at once; a carrier that never commits (the offline replay) has
its records written by the writer thread within a second, and by close(). A record carries a unique `uid`,
and the insert skips a uid already present, so a batch re-sent after a crash is stored once. search() first waits
(briefly) for the queue to empty, so a search sees what was just added. `Archive(path)` without a
queue folder writes SQLite directly (tests, `imguard archive search`). SQLite runs in WAL mode with
synchronous=NORMAL: a committed batch survives a crash of the process.

The per-message price matters (every allowed chat message pays it on the event loop, and the writer
thread competes with the event loop for the GIL), so: a record is a list in ROW_COLUMNS order, gathered
as it is; commit() encodes a read's rows as one JSON array of arrays in one orjson call (json for a row
orjson refuses) and queues it as one queue record; the time is formatted from a per-second cached
prefix, and the writer thread is not woken per record: the first record after a drain wakes it, it
then lingers (WRITER_LINGER) so a batch gathers, and drains everything queued in one pass, decoding a
batch with one parse and inserting it with one multi-row INSERT (SQLite; executemany on PostgreSQL),
without looking up its uids once it has caught up with what a previous process left (_Queued._check_stored).
flush(), search() and close() cut the linger short. Records a previous version queued (one row, or a JSON
object, to a queue record) are still read.

CHAIN. Every record is chained, so that `imguard archive verify` (imguard/archive_audit.py) can prove the archive
unaltered: `digest` = SHA-256 of canonical_bytes(chain_id, chain_seq, the ROW_COLUMNS values) and `chain` =
SHA-256(previous record's chain || digest), the first record's previous chain being GENESIS. The chain is made
where the rows are inserted (_Store.write_rows, in the writer thread: nothing on the event loop), and there is one
chain per writer, so writers never coordinate: several workers share one SQLite file (each holds its own queue
slot, DATA_DIR/queue/archive, archive-1, ...; the slot's lock means one process at a time) and several gateways one
PostgreSQL archive. A queue slot keeps its chain's id (`chain_id` file: the host name and a random part), so a
restarted worker continues its chain where the database says it stopped; an Archive without a queue (tests, the
commands) starts a chain of its own. A re-sent batch is filtered by uid before it is chained (every chain_seq
is taken by one stored record; UNIQUE(chain_id, chain_seq) refuses a fork), and the chain's head moves only once
the transaction committed. Retention removes a record's content but keeps its link (`removed_records`). Records
stored before the chain existed keep NULL chain columns (ALTER TABLE on open) and are reported as unchained.
Cost, measured in the writer thread (SQLite, batches of 500): about 13.5 us per record instead of 7.

Differences the backends cannot hide: PostgreSQL text cannot hold NUL, which is stored as U+FFFD;
searches are case-insensitive on both (SQLite's LIKE is, ILIKE on PostgreSQL).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import itertools
import os
import json
import logging
import re
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import orjson

from imguard.alerts import new_event_id, utc_now
from imguard.model import ChatContext, Decision, FileReport
from imguard.settings import setting

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ArchiveSettings:
    """conversation archive"""

    archive_dsn: str = setting("", "PostgreSQL connection string (e.g. 'postgresql://imguard@db/imguard' or "
                                   "'host=/run/postgresql dbname=imguard') for an archive shared by several "
                                   "gateways; '' keeps it in DATA_DIR/archive.sqlite3.")
    archive_retention: list = setting([], "Retention by group, applied hourly by the gateway (and by `imguard archive "
                                          "retention apply`): GROUP:max=DAYS deletes the records of a group's "
                                          "members after DAYS, GROUP:min=DAYS keeps them at least DAYS (also "
                                          "against the quarantine's limits); GROUP from rules/groups.yaml, * for "
                                          "everyone; legal holds win over both (repeat for several).")

    def __post_init__(self) -> None:
        from imguard.archive_audit import RetentionRule
        for text in self.archive_retention:
            RetentionRule.parse(text)           # ValueError naming the setting and the bad value

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    uid TEXT UNIQUE,                -- the record's own id: a batch re-sent after a crash is stored once
    time TEXT NOT NULL,             -- ISO 8601, UTC
    kind TEXT NOT NULL,             -- 'message' or 'file'
    protocol TEXT, direction TEXT, sender TEXT, recipients TEXT, conversation TEXT,
    client_address TEXT, connection_id TEXT,
    text TEXT,                      -- the message text, when kept
    file_name TEXT, file_size INTEGER, sha256 TEXT, mime TEXT, mechanism TEXT,
    action TEXT NOT NULL, rules TEXT, policy_version TEXT,
    chain_id TEXT, chain_seq INTEGER,   -- the writer's chain and the record's place in it (see CHAIN below)
    digest TEXT,                    -- SHA-256 of the record's canonical bytes
    chain TEXT                      -- SHA-256(previous record's chain || digest): tamper evidence
);
CREATE INDEX IF NOT EXISTS records_time ON records(time);
-- No index on sender: a person search is LIKE '%name%', which no index serves, and every insert paid for
-- one (archives made by earlier versions lose it here).
DROP INDEX IF EXISTS records_sender;
-- Partial: chat messages (nearly every row) have no sha256, and an index entry per message cost each
-- insert; `sha256 = ?` still uses it. (An archive created before keeps its full index: same results.)
CREATE INDEX IF NOT EXISTS records_sha256 ON records(sha256) WHERE sha256 IS NOT NULL;
"""

# The same table in PostgreSQL.
PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id BIGSERIAL PRIMARY KEY,
    uid TEXT UNIQUE,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    protocol TEXT, direction TEXT, sender TEXT, recipients TEXT, conversation TEXT,
    client_address TEXT, connection_id TEXT,
    text TEXT,
    file_name TEXT, file_size BIGINT, sha256 TEXT, mime TEXT, mechanism TEXT,
    action TEXT NOT NULL, rules TEXT, policy_version TEXT,
    chain_id TEXT, chain_seq BIGINT, digest TEXT, chain TEXT
);
-- (time, id): the order of every list of records (newest first, a page at a time), and the keyset of a deep page
-- (`(time, id) < (t, i)`); it serves what records_time did, which earlier versions made and lose here.
CREATE INDEX IF NOT EXISTS records_time_id ON records(time, id);
DROP INDEX IF EXISTS records_time;
-- Not this B-tree on sender: a person search is ILIKE '%name%', which none serves (PG_SEARCH_SCHEMA's trigram
-- indexes do; its prefix indexes serve a conversation's people).
DROP INDEX IF EXISTS records_sender;
CREATE INDEX IF NOT EXISTS records_sha256 ON records(sha256);
-- A room's conversation, in time order (the console).
CREATE INDEX IF NOT EXISTS records_conversation ON records(conversation, time) WHERE conversation <> '';
"""

# PostgreSQL's searches (the console, `imguard archive search`; issue 19): a person or text search is
# ILIKE '%x%', which no B-tree serves; pg_trgm's GIN indexes do, for a term of 3 characters or more. pg_trgm is a
# trusted extension (PostgreSQL 13+: the database's owner may create it); where the role may not, the archive works
# without the trigram indexes (searches read every record) and says so.
# Made by the first gateway (or `imguard archive search`) that opens the archive; the console, read-only, does not.
# On a filled archive this takes a while, once (1,000,000 records: 28-63 s); the gateways' inserts wait in their queue.
PG_SEARCH_SCHEMA = (
    # A conversation's people (`sender = 'p' OR sender LIKE 'p/%'`): B-tree prefixes, whatever the collation. The
    # trigram indexes serve it too, but slowly (every address shares the domain's trigrams: 2.6 s on 1,000,000).
    "CREATE INDEX IF NOT EXISTS records_sender_prefix ON records(sender text_pattern_ops)",
    "CREATE INDEX IF NOT EXISTS records_recipients_prefix ON records(recipients text_pattern_ops)",
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    "CREATE INDEX IF NOT EXISTS records_sender_trgm ON records USING gin (sender gin_trgm_ops)",
    "CREATE INDEX IF NOT EXISTS records_recipients_trgm ON records USING gin (recipients gin_trgm_ops)",
    "CREATE INDEX IF NOT EXISTS records_text_trgm ON records USING gin (text gin_trgm_ops)",
    "CREATE INDEX IF NOT EXISTS records_file_name_trgm ON records USING gin (file_name gin_trgm_ops)",
)


PG_MIGRATION_LOCK = 0x696D6775617264      # the advisory lock of the schema's migration ("imguard")


def pg_search_indexes(conn: Any) -> bool:
    """Create PG_SEARCH_SCHEMA on an autocommit psycopg connection; False (logged) when the role may not."""
    try:
        for statement in PG_SEARCH_SCHEMA:
            conn.execute(statement)
    except Exception as e:  # noqa: BLE001 - psycopg's errors: no privilege, no pg_trgm installed
        log.warning("archive: no trigram search indexes in PostgreSQL (%s); person and text searches read every "
                    "record. A superuser can run: CREATE EXTENSION pg_trgm;", e)
        return False
    return True


COLUMNS = ("id", "time", "kind", "protocol", "direction", "sender", "recipients", "conversation",
           "client_address", "connection_id", "text", "file_name", "file_size", "sha256", "mime", "mechanism",
           "action", "rules", "policy_version")


# The columns a record fills, in the order of the array queued for it and of the INSERT.
ROW_COLUMNS = ("uid", "time", "kind", "protocol", "direction", "sender", "recipients", "conversation",
               "client_address", "connection_id", "text", "file_name", "file_size", "sha256", "mime",
               "mechanism", "action", "rules", "policy_version")
# The chain's columns, filled by the store as it writes (see CHAIN), after ROW_COLUMNS in the INSERT.
CHAIN_COLUMNS = ("chain_id", "chain_seq", "digest", "chain")
STORED_COLUMNS = ROW_COLUMNS + CHAIN_COLUMNS
_INSERT_NAMES = ", ".join(STORED_COLUMNS)

# Added after the first release: an archive made before gets them by ALTER TABLE (its old records stay unchained).
_ADDED_COLUMNS = (("chain_id", "TEXT"), ("chain_seq", "BIGINT"), ("digest", "TEXT"), ("chain", "TEXT"))

# Run after the columns exist (on an old archive: after the ALTER TABLEs).
AUDIT_SCHEMA = """
CREATE UNIQUE INDEX IF NOT EXISTS records_chain ON records(chain_id, chain_seq);
-- The links of records that retention removed: the chain stays verifiable without their content.
CREATE TABLE IF NOT EXISTS removed_records (
    chain_id TEXT NOT NULL, chain_seq BIGINT NOT NULL, digest TEXT NOT NULL, chain TEXT NOT NULL,
    time TEXT, removed_at TEXT NOT NULL, reason TEXT,
    PRIMARY KEY (chain_id, chain_seq)
);
-- Legal holds (imguard/archive_audit.py): a record a hold covers is kept whatever the retention rules say.
CREATE TABLE IF NOT EXISTS holds (
    id TEXT PRIMARY KEY, scope TEXT NOT NULL, value TEXT NOT NULL, reason TEXT,
    created_at TEXT NOT NULL, created_by TEXT, released_at TEXT, released_by TEXT
);
"""

GENESIS = "0" * 64      # the "previous chain" of a chain's first record


def canonical_bytes(chain_id: str, chain_seq: int, values: list[Any]) -> bytes:
    """The bytes a record's digest is taken over: its chain, its place, and its ROW_COLUMNS values, as JSON.
    `imguard archive verify` recomputes them from the stored row: the same values give the same bytes."""
    record = [chain_id, chain_seq, *values]
    try:
        return orjson.dumps(record)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(record, separators=(",", ":")).encode()


def record_digest(chain_id: str, chain_seq: int, values: list[Any]) -> str:
    return hashlib.sha256(canonical_bytes(chain_id, chain_seq, values)).hexdigest()


def link(previous_chain: str, digest: str) -> str:
    """A record's `chain`: SHA-256 over the previous record's chain and this record's digest (32 bytes each)."""
    return hashlib.sha256(bytes.fromhex(previous_chain) + bytes.fromhex(digest)).hexdigest()


class Chain:
    """One writer's hash chain (CHAIN in the module text). Only the thread that writes a store uses it."""

    def __init__(self, chain_id: str):
        self.chain_id = chain_id
        self.seq: int | None = None         # the last record's place; None until read from the database
        self.head = GENESIS

    def extend(self, rows: list[list[Any]]) -> tuple[list[list[Any]], int, str]:
        """`rows` with their chain columns, and the new (seq, head), which the caller keeps once committed."""
        assert self.seq is not None
        # record_digest and link, inlined: the chain runs on raw digests, hex only for the stored columns.
        chain_id, seq, out = self.chain_id, self.seq, []
        head = bytes.fromhex(self.head)
        sha256, dumps = hashlib.sha256, orjson.dumps
        for row in rows:
            seq += 1
            try:
                data = dumps([chain_id, seq, *row])
            except (TypeError, orjson.JSONEncodeError):
                data = canonical_bytes(chain_id, seq, row)
            digest = sha256(data).digest()
            head = sha256(head + digest).digest()
            out.append([*row, chain_id, seq, digest.hex(), head.hex()])
        return out, seq, head.hex()


def new_chain_id() -> str:
    """A chain's name: the host, then random (two gateways with one host name never share a chain)."""
    return f"{socket.gethostname()}/{os.urandom(6).hex()}"


def queue_chain_id(queue_dir: Path) -> str:
    """The chain of the writer that holds the queue at `queue_dir` (one process at a time holds a queue): kept
    in the queue folder, so a restarted worker continues its chain."""
    path = Path(queue_dir) / "chain_id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        chain_id = new_chain_id()
        path.write_text(chain_id + "\n")
        return chain_id

_SURROGATE = re.compile("[\ud800-\udfff]")
# ".000+00:00" ... ".999+00:00": the archive's times end as datetime.isoformat(timespec="milliseconds") writes them.
_MILLISECOND_OFFSETS = tuple(f".{millisecond:03d}+00:00" for millisecond in range(1000))


def _now() -> str:
    return utc_now(_MILLISECOND_OFFSETS)


def _encode_row(row: list[Any]) -> bytes:
    try:
        return orjson.dumps(row)
    except (TypeError, orjson.JSONEncodeError):
        # orjson refuses a lone surrogate (text decoded with surrogateescape) or an int beyond 64 bits:
        # json writes both; a lone surrogate becomes U+FFFD so the database can take the text.
        row = [_SURROGATE.sub("\ufffd", v) if isinstance(v, str) else v for v in row]
        return json.dumps(row).encode()


def _encode_rows(rows: list[list[Any]]) -> bytes:
    """The queue record of one commit: its rows as one JSON array of arrays, in one orjson call (a row orjson
    refuses is written by _encode_row, the others by orjson, into the same array)."""
    try:
        return orjson.dumps(rows)
    except (TypeError, orjson.JSONEncodeError):
        return b"[" + b",".join([_encode_row(row) for row in rows]) + b"]"


def _decode_rows(payloads: list[bytes]) -> list[list[Any]]:
    """The rows of a run of queued records: one orjson parse for the whole run, else one by one. A record is a
    commit's rows (an array of arrays, _encode_rows), or one row (an array; what versions before wrote), or a
    JSON object (older still)."""
    try:
        items = orjson.loads(b"[" + b",".join(payloads) + b"]")
    except orjson.JSONDecodeError:
        items = [json.loads(p) for p in payloads]
    rows: list[list[Any]] = []
    for item in items:
        if isinstance(item, dict):          # queued by a version that wrote JSON objects
            rows.append([item.get(name) for name in ROW_COLUMNS])
        elif item and isinstance(item[0], list):    # a commit's rows (a row starts with its uid, a string)
            rows.extend(item)
        else:
            rows.append(item)
    return rows


@dataclass
class Query:
    person: str = ""        # sender or recipient, substring
    text: str = ""          # substring of the message text or file name
    since: str = ""         # ISO time, inclusive
    until: str = ""         # ISO time, exclusive
    protocol: str = ""
    sha256: str = ""
    limit: int = 1000
    conversation: str = ""  # exact
    after_id: int = -1      # >= 0: records stored after this id, in id order (an export's cursor)


class Archive:
    """Archive(path) keeps the records in SQLite at `path`; Archive(dsn=...) in PostgreSQL. With a
    `queue_dir`, records go through the on-disk queue and a writer thread (the gateway's way); without
    one, SQLite is written directly and PostgreSQL is opened for searching only."""

    def __init__(self, path: Path | None = None, dsn: str = "", queue_dir: Path | None = None,
                 batch: int = 500):
        if dsn:
            store: _Store = _PostgresStore(dsn)
        elif path is not None:
            store = _SqliteStore(Path(path))
        else:
            raise ValueError("an archive needs a SQLite path or a PostgreSQL DSN")
        if queue_dir is not None:
            self._backend: _Store = _Queued(store, Path(queue_dir), batch)
        elif dsn:
            self._backend = _SearchOnly(store)
        else:
            self._backend = store
        self.path = Path(path) if path is not None else None
        self.dsn = dsn
        self.settings = ArchiveSettings(archive_dsn=dsn)

    # Rows are lists in ROW_COLUMNS order, built in one expression: this runs for every chat message.
    def add_message(self, text: str | None, ctx: ChatContext, decision: Decision) -> str:
        """Queue the record; its id (the zip-password memory names a message by it)."""
        record_id = new_event_id()
        self._backend.insert([record_id, _now(), "message", ctx.protocol, ctx.direction, ctx.sender,
                              " ".join(ctx.recipients), ctx.conversation, ctx.client_address, ctx.connection_id,
                              text, None, None, None, None, None,
                              decision.action, " ".join([m.rule_id for m in decision.matches]),
                              decision.policy_version])
        return record_id

    def add_file(self, report: FileReport, ctx: ChatContext, decision: Decision) -> None:
        self._backend.insert([new_event_id(), _now(), "file", ctx.protocol, ctx.direction, ctx.sender,
                              " ".join(ctx.recipients), ctx.conversation, ctx.client_address, ctx.connection_id,
                              None, report.name, report.size, report.sha256, report.mime, ctx.transfer_mechanism,
                              decision.action, " ".join(decision.rule_ids), decision.policy_version])

    def database(self) -> "_Store":
        """The database itself (fetch, execute, transaction): verify, holds and retention (imguard/archive_audit.py).
        Records still queued are written first."""
        self._backend.flush(10.0)
        backend = self._backend
        return getattr(backend, "store", backend)

    def commit(self) -> None:
        """Put the records added so far on disk (one write); before the traffic they record is forwarded.
        Raises OSError when the disk refuses."""
        self._backend.commit()

    def search(self, query: Query) -> list[dict[str, Any]]:
        return self._backend.search(query)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every added record is in the database."""
        return self._backend.flush(timeout)

    def close(self) -> None:
        self._backend.close()


def open_archive(data_dir: Path, settings: ArchiveSettings | None = None) -> Archive:
    """The gateway's archive: PostgreSQL when `archive_dsn` is set, else DATA_DIR/archive.sqlite3; both
    behind the queue in DATA_DIR/queue/archive."""
    settings = settings or ArchiveSettings()
    data_dir = Path(data_dir)
    queue_dir = data_dir / "queue" / "archive"
    if settings.archive_dsn:
        store = Archive(dsn=settings.archive_dsn, queue_dir=queue_dir)
    else:
        store = Archive(data_dir / "archive.sqlite3", queue_dir=queue_dir)
    store.settings = settings
    return store


def _where(query: Query, like: str, mark: str) -> tuple[str, list[Any]]:
    where, args = [], []
    if query.person:
        where.append(f"(sender {like} {mark} ESCAPE '\\' OR recipients {like} {mark} ESCAPE '\\')")
        args += [f"%{_escape_like(query.person)}%"] * 2
    if query.text:
        where.append(f"(text {like} {mark} ESCAPE '\\' OR file_name {like} {mark} ESCAPE '\\')")
        args += [f"%{_escape_like(query.text)}%"] * 2
    if query.since:
        where.append(f"time >= {mark}")
        args.append(query.since)
    if query.until:
        where.append(f"time < {mark}")
        args.append(query.until)
    if query.protocol:
        where.append(f"protocol = {mark}")
        args.append(query.protocol)
    if query.sha256:
        where.append(f"sha256 = {mark}")
        args.append(query.sha256.lower())
    if query.conversation:
        where.append(f"conversation = {mark}")
        args.append(query.conversation)
    if query.after_id >= 0:
        where.append(f"id > {mark}")
        args.append(query.after_id)
    sql = f"SELECT {', '.join(COLUMNS)} FROM records"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {'id' if query.after_id >= 0 else 'time, id'} LIMIT {mark}"
    args.append(query.limit)
    return sql, args


class _Store:
    """A database: write_rows() stores a batch of rows (lists in ROW_COLUMNS order) in one transaction
    (raising when it could not), search(). A store that writes extends `chain` (its writer's; one writer per
    chain): rows whose uid is already stored (a batch re-sent after a crash) are left out first, so every
    chain_seq is taken by exactly one stored record."""

    chain: Chain
    mark = "?"

    def fetch(self, sql: str, args: list[Any] | tuple = ()) -> list[tuple]: ...

    def rows(self, sql: str, args: list[Any] | tuple = ()) -> Iterable[tuple]:
        """The rows of a query that may return millions (verify), read a batch at a time."""
        return self.fetch(sql, args)

    def transaction(self, statements: list[tuple[str, list[Any]]]) -> None: ...

    def execute(self, sql: str, args: list[Any] | tuple = ()) -> None:
        self.transaction([(sql, list(args))])

    def _fresh(self, rows: list[list[Any]]) -> list[list[Any]]:
        """The rows not stored yet (called inside the write's transaction)."""
        unique = list({row[0]: row for row in rows}.values())
        present: set[str] = set()
        for start in range(0, len(unique), 500):
            uids = [row[0] for row in unique[start:start + 500]]
            marks = ", ".join([self.mark] * len(uids))
            present.update(u for (u,) in self.fetch(f"SELECT uid FROM records WHERE uid IN ({marks})", uids))
        return [row for row in unique if row[0] not in present] if present else unique

    def _extend(self, rows: list[list[Any]]) -> tuple[list[list[Any]], int, str]:
        chain = self.chain
        if chain.seq is None:           # where this writer's chain stopped: its last record, stored or removed
            chain.seq, chain.head = 0, GENESIS
            m = self.mark
            for table in ("records", "removed_records"):
                found = self.fetch(f"SELECT chain_seq, chain FROM {table} WHERE chain_id = {m} "
                                   "ORDER BY chain_seq DESC LIMIT 1", [chain.chain_id])
                if found and found[0][0] > chain.seq:
                    chain.seq, chain.head = found[0]
        return chain.extend(rows)

    def insert(self, row: list[Any]) -> None:
        self.write_rows([row])

    def write_rows(self, rows: list[list[Any]], check_stored: bool = True) -> None:
        """(check_stored=False: the caller knows none of the rows can be stored already; no lookup of uids.)"""
    def search(self, query: Query) -> list[dict[str, Any]]: ...
    def commit(self) -> None: ...
    def flush(self, timeout: float) -> bool: return True
    def close(self) -> None: ...


@functools.lru_cache(maxsize=16)
def _sqlite_insert(rows: int) -> str:
    """INSERT of `rows` rows (already without the uids stored: _Store._fresh)."""
    one = f"({', '.join(['?'] * len(STORED_COLUMNS))})"
    return f"INSERT INTO records ({_INSERT_NAMES}) VALUES " + ", ".join([one] * rows)


def _private(path: Path) -> None:
    """Create the database file 0600 before SQLite opens it (SQLite would make it 0644 under the usual umask, and
    gives its -wal and -shm files the database's mode); tighten one an older version left readable by others."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if os.stat(part).st_mode & 0o077:
                os.chmod(part, 0o600)
        except OSError:     # absent, or another user's file: `imguard archive search` only reads it
            pass


class _SqliteStore(_Store):
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _private(path)
        self._lock = threading.RLock()     # fetch() inside write_rows() takes it again
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(records)")}
        for name, kind in _ADDED_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE records ADD COLUMN {name} {kind}")
        self._db.executescript(AUDIT_SCHEMA)
        self.chain = Chain(new_chain_id())
        self._max_variables = self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)

    # Rows go in multi-row statements: the sqlite3 module releases and retakes the GIL around every statement
    # step, so one row per step (executemany) was a GIL handoff with the event loop per row. The statement
    # sizes are fixed, so SQLite's statement cache keeps them prepared (a batch of 200 rows is 128 + 2 x 32 + 8);
    # bounded by SQLite's limit on bound variables (32766 since 3.32, 999 before).
    CHUNKS = (128, 32, 8, 1)

    def fetch(self, sql: str, args: list[Any] | tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def rows(self, sql: str, args: list[Any] | tuple = ()) -> Iterable[tuple]:
        with self._lock:          # one read transaction: a consistent snapshot (WAL lets the writers go on)
            cursor = self._db.execute(sql, args)
            while batch := cursor.fetchmany(5000):
                yield from batch

    def transaction(self, statements: list[tuple[str, list[Any]]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def write_rows(self, rows: list[list[Any]], check_stored: bool = True) -> None:
        sizes = [n for n in self.CHUNKS if n * len(STORED_COLUMNS) <= self._max_variables] or [1]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows, seq, head = self._extend(self._fresh(rows) if check_stored else rows)
                start = 0
                for size in sizes:
                    while len(rows) - start >= size:
                        part = rows[start:start + size]
                        self._db.execute(_sqlite_insert(size), list(itertools.chain.from_iterable(part)))
                        start += size
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self.chain.seq, self.chain.head = seq, head

    def search(self, query: Query) -> list[dict[str, Any]]:
        sql, args = _where(query, "LIKE", "?")
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [dict(zip(COLUMNS, row, strict=True)) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _pg_safe(value: Any) -> Any:
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


class _PostgresStore(_Store):
    def __init__(self, dsn: str):
        import psycopg  # imported here: only a PostgreSQL archive needs it

        self._psycopg = psycopg
        self.dsn = dsn
        self.chain = Chain(new_chain_id())
        self._conn = None
        self._lock = threading.RLock()     # fetch() inside write_rows() takes it again
        with self._lock:
            self._connection()          # fail early on a wrong DSN or a missing server

    def _connection(self):
        if self._conn is None or self._conn.closed:
            self._conn = self._psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
            # One migration at a time: gateways that start together would race on CREATE ... IF NOT EXISTS.
            self._conn.execute("SELECT pg_advisory_lock(%s)", (PG_MIGRATION_LOCK,))
            try:
                self._conn.execute(PG_SCHEMA)
                for name, kind in _ADDED_COLUMNS:
                    self._conn.execute(f"ALTER TABLE records ADD COLUMN IF NOT EXISTS {name} {kind}")
                self._conn.execute(AUDIT_SCHEMA)
                pg_search_indexes(self._conn)
            finally:
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (PG_MIGRATION_LOCK,))
        return self._conn

    mark = "%s"
    INSERT = f"INSERT INTO records ({_INSERT_NAMES}) VALUES ({', '.join(['%s'] * len(STORED_COLUMNS))})"

    def fetch(self, sql: str, args: list[Any] | tuple = ()) -> list[tuple]:
        with self._lock:
            return self._connection().execute(sql, args).fetchall()

    def rows(self, sql: str, args: list[Any] | tuple = ()) -> Iterable[tuple]:
        with self._lock:
            conn = self._connection()
            with conn.transaction(), conn.cursor(name="imguard_rows") as cursor:   # server side, a batch at a time
                cursor.itersize = 5000
                cursor.execute(sql, args)
                yield from cursor

    def transaction(self, statements: list[tuple[str, list[Any]]]) -> None:
        with self._lock:
            conn = self._connection()
            with conn.transaction():
                for sql, args in statements:
                    conn.execute(sql, args)

    def write_rows(self, rows: list[list[Any]], check_stored: bool = True) -> None:
        with self._lock:
            try:
                conn = self._connection()
                with conn.transaction():
                    # PostgreSQL text cannot hold NUL: the digest is taken over what is stored.
                    rows = [[_pg_safe(v) for v in row] for row in rows]
                    rows, seq, head = self._extend(self._fresh(rows) if check_stored else rows)
                    with conn.cursor() as cur:
                        cur.executemany(self.INSERT, rows)
            except Exception:
                self._drop_connection()       # reconnect on the next try
                raise
            self.chain.seq, self.chain.head = seq, head

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001
                pass
            self._conn = None

    def search(self, query: Query) -> list[dict[str, Any]]:
        sql, args = _where(query, "ILIKE", "%s")
        with self._lock:
            rows = self._connection().execute(sql, [_pg_safe(a) for a in args]).fetchall()
        return [dict(zip(COLUMNS, row, strict=True)) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._drop_connection()


class _SearchOnly(_Store):
    """A shared PostgreSQL archive opened by `imguard archive search`: the running gateways own the writes."""

    def __init__(self, store: _Store):
        self.store = store

    def insert(self, row: list[Any]) -> None:
        raise RuntimeError("this archive was opened for searching only (no queue folder)")

    def search(self, query: Query) -> list[dict[str, Any]]:
        return self.store.search(query)

    def close(self) -> None:
        self.store.close()


class _Queued(_Store):
    """A store behind a durable on-disk queue and a writer thread: insert() is one local append, the
    thread writes batches and retries with backoff while the database refuses.

    Waking the thread per record cost an Event.set() on the event loop and a one-record transaction in a
    thread that took the GIL from the event loop for every message, so insert() wakes it only when it
    is not already due (`_due`): the first record after a drain. The thread then lingers WRITER_LINGER
    seconds while records gather, and drains the queue in batches; under steady traffic that is one
    wake-up per linger, not per record. flush() and close() set `_hurry` to cut the linger short."""

    RETRY_MAX = 30.0
    GATHER_MAX = 256            # records gathered before they are written even without a commit()
    WRITER_LINGER = 0.05        # a record reaches the database this much later; search() flushes first
    IDLE_POLL = 1.0             # a wake-up lost to a race costs at most this delay

    def __init__(self, store: _Store, queue_dir: Path, batch: int):
        from imguard.sinks.queue import open_free_queue

        self.store = store
        self.batch = batch
        self.queue = open_free_queue(queue_dir, 256 * 1024 * 1024)
        store.chain = Chain(queue_chain_id(self.queue.directory))
        self._wake = threading.Event()
        self._hurry = threading.Event()
        self._stop = threading.Event()
        self._gathered: list[list[Any]] = []    # rows not yet in the queue (see insert)
        self._gather_lock = threading.Lock()
        self._due = True                # the thread drains at start (a previous run's backlog)
        # Whether the rows read next may be stored already: those a previous process queued (it may have crashed
        # between its insert and its ack) and those of a write that failed (PostgreSQL may have committed it).
        # Once a drain has caught up, every row it reads was queued by this process and never written: the
        # lookup of their uids (_Store._fresh) is skipped.
        self._check_stored = True
        self.wakeups = 0                # drains started: a measure of what the thread costs the event loop
        self.last_error = ""
        self._wake.set()
        self._thread = threading.Thread(target=self._run, name="imguard-archive", daemon=True)
        self._thread.start()

    def insert(self, row: list[Any]) -> None:
        # Gathered until commit(): the carrier commits before it forwards what the records are about (the
        # gateway: before the first stanza of a read goes out), so a record is on disk before its message
        # has crossed, in one write for the whole read instead of one per message.
        with self._gather_lock:
            self._gathered.append(row)
            full = len(self._gathered) >= self.GATHER_MAX
        if full:
            self.commit()

    def commit(self) -> None:
        """Write the gathered rows to the on-disk queue: one queue record for all of them, encoded in one orjson
        call (a read's rows are a record's, not a record each: one encoding, one CRC, one parse in the writer).
        Raises OSError when the disk refuses (the rows are lost, as their one write was)."""
        if not self._gathered:
            return
        with self._gather_lock:
            rows, self._gathered = self._gathered, []
        if rows:
            self.queue.append_many([_encode_rows(rows)])
            if not self._due:
                self._due = True
                self._wake.set()

    def _commit_quietly(self) -> None:
        try:
            self.commit()
        except OSError as e:
            self.last_error = f"{type(e).__name__}: {e}"
            log.warning("archive: cannot write the queue (%s); records were lost", self.last_error)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.IDLE_POLL)
            self._wake.clear()
            self._commit_quietly()          # what a carrier that never commits gathered (replay, scan)
            self._hurry.wait(self.WRITER_LINGER)
            self._hurry.clear()
            # Cleared before draining: a record appended after this point sets `_due` and wakes the
            # thread again; one appended before it is found by the drain.
            self._due = False
            self.wakeups += 1
            self._drain()

    def _drain(self) -> None:
        wait = 0.5
        while not self._stop.is_set():
            last, payloads = self.queue.peek_payloads(self.batch)
            if not payloads:
                return
            try:
                self.store.write_rows(_decode_rows(payloads), check_stored=self._check_stored)
            except Exception as e:  # noqa: BLE001 - the database is down or refused: retry later
                self._check_stored = True
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("archive: insert failed (%s); %d records wait in the queue",
                            self.last_error, self.queue.backlog_records)
                if self._stop.wait(wait):
                    return
                wait = min(wait * 2, self.RETRY_MAX)
                continue
            wait = 0.5
            self.queue.ack_through(last)
            if len(payloads) < self.batch:
                self._check_stored = False      # caught up: what comes next was queued by this process
                return          # caught up: what came meanwhile waits for the next linger, not a batch of one

    def flush(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        self._commit_quietly()
        while self.queue.peek() is not None:
            if time.monotonic() > deadline:
                return False
            self._hurry.set()
            self._wake.set()
            time.sleep(0.01)
        return True

    def search(self, query: Query) -> list[dict[str, Any]]:
        self.flush(5.0)
        return self.store.search(query)

    def close(self) -> None:
        self.flush(5.0)
        self._stop.set()
        self._hurry.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.store.close()
        if not self._thread.is_alive():
            self.queue.close()


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def to_jsonl(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# A cell starting with one of these is a formula to a spreadsheet: exporting chat text verbatim would
# let a sender run a formula on the auditor's machine (CSV injection).
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _csv_safe(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_PREFIXES):
        return "'" + value
    return value


def to_csv(records: Iterable[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    for record in records:
        writer.writerow({k: _csv_safe(v) for k, v in record.items()})
    return out.getvalue()
