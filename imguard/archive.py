"""The conversation archive: every message and file transfer that crossed (or was stopped), in SQLite.

One table, one row per record, so a search by person, text, time, protocol or hash is one query.
The database runs in WAL mode with synchronous=NORMAL: a committed record survives a crash of the
gateway process (the WAL is in the kernel's hands at commit), and writers do not wait for an fsync
per message. Text is stored only when the pipeline is told to keep it.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from imguard.model import ChatContext, Decision, FileReport

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,             -- ISO 8601, UTC
    kind TEXT NOT NULL,             -- 'message' or 'file'
    protocol TEXT, direction TEXT, sender TEXT, recipients TEXT, conversation TEXT,
    client_address TEXT, connection_id TEXT,
    text TEXT,                      -- the message text, when kept
    file_name TEXT, file_size INTEGER, sha256 TEXT, mime TEXT, mechanism TEXT,
    action TEXT NOT NULL, rules TEXT, policy_version TEXT
);
CREATE INDEX IF NOT EXISTS records_time ON records(time);
CREATE INDEX IF NOT EXISTS records_sender ON records(sender);
CREATE INDEX IF NOT EXISTS records_sha256 ON records(sha256);
"""

COLUMNS = ("id", "time", "kind", "protocol", "direction", "sender", "recipients", "conversation",
           "client_address", "connection_id", "text", "file_name", "file_size", "sha256", "mime", "mechanism",
           "action", "rules", "policy_version")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Query:
    person: str = ""        # sender or recipient, substring
    text: str = ""          # substring of the message text or file name
    since: str = ""         # ISO time, inclusive
    until: str = ""         # ISO time, exclusive
    protocol: str = ""
    sha256: str = ""
    limit: int = 1000


class Archive:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def _insert(self, row: dict[str, Any]) -> None:
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._lock:
            self._db.execute(f"INSERT INTO records ({names}) VALUES ({marks})", tuple(row.values()))

    @staticmethod
    def _context_columns(ctx: ChatContext, decision: Decision) -> dict[str, Any]:
        return {"time": _now(), "protocol": ctx.protocol, "direction": ctx.direction, "sender": ctx.sender,
                "recipients": " ".join(ctx.recipients), "conversation": ctx.conversation,
                "client_address": ctx.client_address, "connection_id": ctx.connection_id,
                "action": decision.action, "rules": " ".join(decision.rule_ids),
                "policy_version": decision.policy_version}

    def add_message(self, text: str | None, ctx: ChatContext, decision: Decision) -> None:
        self._insert({**self._context_columns(ctx, decision), "kind": "message", "text": text})

    def add_file(self, report: FileReport, ctx: ChatContext, decision: Decision) -> None:
        self._insert({**self._context_columns(ctx, decision), "kind": "file", "file_name": report.name,
                      "file_size": report.size, "sha256": report.sha256, "mime": report.mime,
                      "mechanism": ctx.transfer_mechanism})

    def search(self, query: Query) -> list[dict[str, Any]]:
        where, args = [], []
        if query.person:
            where.append("(sender LIKE ? ESCAPE '\\' OR recipients LIKE ? ESCAPE '\\')")
            args += [f"%{_escape_like(query.person)}%"] * 2
        if query.text:
            where.append("(text LIKE ? ESCAPE '\\' OR file_name LIKE ? ESCAPE '\\')")
            args += [f"%{_escape_like(query.text)}%"] * 2
        if query.since:
            where.append("time >= ?")
            args.append(query.since)
        if query.until:
            where.append("time < ?")
            args.append(query.until)
        if query.protocol:
            where.append("protocol = ?")
            args.append(query.protocol)
        if query.sha256:
            where.append("sha256 = ?")
            args.append(query.sha256.lower())
        sql = f"SELECT {', '.join(COLUMNS)} FROM records"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY time, id LIMIT ?"
        args.append(query.limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [dict(zip(COLUMNS, row)) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


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


def to_csv(records: Iterable[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS)
    writer.writeheader()
    for record in records:
        writer.writerow({k: _csv_safe(v) for k, v in record.items()})
    return out.getvalue()
