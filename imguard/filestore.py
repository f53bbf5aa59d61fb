"""The file store: the bytes of every file that crossed (allowed ones too), kept so a later signature can find it.

Layout (after Suricata's filestore, like the quarantine's): DATA_DIR/files/ab/<sha256> holds the bytes, 0600 in
0700 folders, written to a temporary file and renamed into place (imguard/quarantine.py `write_atomic`).
Content addressing: a name from the wire never becomes a path, and a file sent a hundred times is kept once.
Who sent it to whom, when and over what are the archive's file records (imguard/archive.py): the store keeps
only bytes and the small index DATA_DIR/files/index.sqlite3, one row per SHA-256 ever stored, kept forever
(`stored` says whether its bytes are still here, `removed` when retention let them go).

Blocked files are not stored here: the quarantine already keeps them (imguard/quarantine.py), and the retro-hunt
(imguard/retrohunt.py) reads a file's bytes from either place.

Retention, by age and by total size (the settings below), runs from put(): the size cap as soon as a put passes
it (the oldest files go first), the age limit at most once per `RETENTION_EVERY` seconds. Several workers share
the folder: SQLite serialises their index writes.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sqlite3
import threading
import time
from pathlib import Path

from imguard.quarantine import SHA256_RE, write_atomic
from imguard.settings import GiB, MiB, setting

RETENTION_EVERY = 600.0         # seconds between two age sweeps started by put()

INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    sha256 TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    first_stored TEXT NOT NULL,     -- ISO 8601 UTC: when its bytes were first kept
    stored_at REAL NOT NULL,        -- epoch seconds of the last time its bytes were (re)written: retention's clock
    stored INTEGER NOT NULL,        -- 1: the bytes are in the store; 0: retention removed them (the hash stays)
    removed TEXT                    -- when retention removed them
);
CREATE INDEX IF NOT EXISTS files_stored ON files(stored, stored_at);
-- The retro-hunt alerts raised: a later background hunt does not raise the same file and rules again.
CREATE TABLE IF NOT EXISTS hunted (
    sha256 TEXT NOT NULL,
    rules TEXT NOT NULL,            -- the rule ids that blocked it, sorted, space-separated
    time TEXT NOT NULL,
    PRIMARY KEY (sha256, rules)
);
"""


@dataclasses.dataclass(frozen=True)
class FileStoreSettings:
    """file store and retro-hunt"""

    filestore_enabled: bool = setting(True, "Keep the bytes of every file that crosses (allowed ones too; blocked "
                                            "ones are in the quarantine) in DATA_DIR/files, so a retro-hunt can "
                                            "rescan them when the signatures change.")
    filestore_max_age_days: int = setting(30, "Kept files older than this are deleted by retention (their SHA-256 "
                                              "stays in the index and the archive forever).")
    filestore_max_bytes: int = setting(10 * GiB, "Total size of the file store; the oldest files are deleted first "
                                                 "when a new one passes it.")
    filestore_max_file_bytes: int = setting(100 * MiB, "A file larger than this is not kept (its hash is indexed): "
                                                       "one huge transfer must not push out a week of others.")
    retrohunt_on_reload: bool = setting(True, "When a reload changes the signatures, rescan the kept files in the "
                                              "background at low priority and raise a `retrohunt` alert for each "
                                              "file the new signatures now block.")
    retrohunt_window_days: int = setting(30, "How far back the retro-hunt after a reload looks (files whose "
                                             "archive records are younger than this).")


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class Retention:
    removed: int = 0            # files whose bytes were deleted
    freed: int = 0              # bytes


class FileStore:
    def __init__(self, root: Path, settings: FileStoreSettings = FileStoreSettings()):
        self.root = Path(root)
        self.settings = settings
        self._lock = threading.Lock()
        self._last_sweep = 0.0
        if not self.root.parent.is_dir():       # the data folder: 0700 too, not the umask's mode
            from imguard.runtime import ensure_data_dir
            ensure_data_dir(self.root.parent)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        index = self.root / "index.sqlite3"
        fd = os.open(index, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(index, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(INDEX_SCHEMA)

    def path(self, sha256: str) -> Path:
        if not SHA256_RE.match(sha256):
            raise ValueError(f"not a SHA-256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    # --- keeping ------------------------------------------------------------------------------------

    def put(self, data: "bytes | Path", sha256: str) -> Path | None:
        """Keep `data` (bytes, or a file the carrier spooled to disk) under `sha256`. Returns its path, or None
        when it is too large to keep (its hash is indexed anyway). Raises OSError when the disk refuses."""
        path = self.path(sha256)
        size = Path(data).stat().st_size if isinstance(data, (str, Path)) else len(data)
        keep = 0 < size <= self.settings.filestore_max_file_bytes
        now = time.time()
        with self._lock:
            if keep:
                path.parent.mkdir(exist_ok=True, mode=0o700)
                if not path.exists():
                    write_atomic(path, Path(data) if isinstance(data, (str, Path)) else bytes(data))
            self._db.execute("INSERT INTO files (sha256, size, first_stored, stored_at, stored) VALUES (?, ?, ?, ?, ?) "
                             "ON CONFLICT(sha256) DO UPDATE SET stored_at = excluded.stored_at, "
                             "stored = MAX(stored, excluded.stored), removed = CASE WHEN excluded.stored = 1 THEN "
                             "NULL ELSE removed END",
                             (sha256, size, _utc_now(), now, 1 if keep else 0))
            over = keep and self.total_bytes() > self.settings.filestore_max_bytes
            due = now - self._last_sweep >= RETENTION_EVERY
        if over or due:
            self.apply_retention(now)
        return path if keep else None

    def read(self, sha256: str) -> bytes | None:
        """The kept bytes, or None when they are not (or no longer) here."""
        try:
            return self.path(sha256).read_bytes()
        except (FileNotFoundError, ValueError):
            return None

    def known(self, sha256: str) -> dict | None:
        """The index row of a hash ever stored: {size, first_stored, stored, removed}, or None."""
        row = self._db.execute("SELECT size, first_stored, stored, removed FROM files WHERE sha256 = ?",
                               (sha256,)).fetchone()
        if row is None:
            return None
        return {"size": row[0], "first_stored": row[1], "stored": bool(row[2]), "removed": row[3]}

    def remember_hunted(self, sha256: str, rules: list[str]) -> bool:
        """Note that a retro-hunt alert named `sha256` blocked by `rules`; False when one already had."""
        with self._lock:
            cursor = self._db.execute("INSERT OR IGNORE INTO hunted (sha256, rules, time) VALUES (?, ?, ?)",
                                      (sha256, " ".join(sorted(rules)), _utc_now()))
        return cursor.rowcount == 1

    def total_bytes(self) -> int:
        return self._db.execute("SELECT COALESCE(SUM(size), 0) FROM files WHERE stored = 1").fetchone()[0]

    def count(self) -> tuple[int, int]:
        """(hashes indexed, files whose bytes are kept)."""
        return self._db.execute("SELECT COUNT(*), COALESCE(SUM(stored), 0) FROM files").fetchone()

    # --- retention ----------------------------------------------------------------------------------

    def apply_retention(self, now: float | None = None) -> Retention:
        """Delete the bytes of files older than filestore_max_age_days, then the oldest until the total fits
        filestore_max_bytes. Their index rows stay (stored = 0, removed = when)."""
        now = time.time() if now is None else now
        removed = freed = 0
        with self._lock:
            self._last_sweep = now
            cutoff = now - self.settings.filestore_max_age_days * 86400
            due = self._db.execute("SELECT sha256, size FROM files WHERE stored = 1 AND stored_at < ?",
                                   (cutoff,)).fetchall()
            excess = self.total_bytes() - sum(size for _, size in due) - self.settings.filestore_max_bytes
            if excess > 0:
                for sha256, size in self._db.execute("SELECT sha256, size FROM files WHERE stored = 1 AND "
                                                     "stored_at >= ? ORDER BY stored_at", (cutoff,)):
                    if excess <= 0:
                        break
                    due.append((sha256, size))
                    excess -= size
            when = _utc_now()
            for sha256, size in due:
                try:
                    self.path(sha256).unlink()
                except FileNotFoundError:
                    pass
                self._db.execute("UPDATE files SET stored = 0, removed = ? WHERE sha256 = ?", (when, sha256))
                removed += 1
                freed += size
        return Retention(removed, freed)

    def close(self) -> None:
        self._db.close()


