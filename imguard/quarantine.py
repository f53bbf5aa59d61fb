"""The quarantine: files that policy blocked or quarantined, kept for review and evidence.

Layout (after Suricata's filestore): DATA_DIR/quarantine/ab/<sha256> holds the bytes and
DATA_DIR/quarantine/ab/<sha256>.json the sidecar: the file's report and one entry per time it was
seen (context, decision, time). Content addressing means a file name from the wire never becomes a
path, and the same file sent a hundred times is stored once. Folders are 0700 and files 0600: only
the gateway's user can read them. Writes go to a temporary file and are renamed into place, so a
crash never leaves a half-written file under its final name.

The ledger (DATA_DIR/quarantine/ledger.jsonl) makes the quarantine tamper-evident: one line per file stored, per
file removed by retention and per step of a release (the console's workflow, `record_step`), each carrying
SHA-256(previous line's chain || its digest), as the archive's records do. `imguard archive verify` walks it
(verify()): a line altered or deleted breaks the chain, and every file the ledger says is kept must be there with
its SHA-256. Files stored before the ledger existed are counted as unchained. Lines are appended under an
exclusive lock on the ledger (several workers share the folder).
Retention (apply_retention) spares a file that `keep(sidecar)` says is under a legal hold or a minimum retention
(imguard/archive_audit.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from imguard.model import ChatContext, Decision, FileReport
from imguard.settings import GiB, setting

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclasses.dataclass(frozen=True)
class QuarantineSettings:
    """quarantine"""

    quarantine_max_age_days: int = setting(90, "Quarantined files older than this are deleted by retention.")
    quarantine_max_bytes: int = setting(10 * GiB, "Total size of the quarantine; the oldest files are deleted "
                                                  "first when it is exceeded.")


def write_atomic(path: Path, data: "bytes | Path") -> None:
    """`data` (bytes, or a file to copy: a transfer spooled to disk) at `path`, 0600, via a temporary file renamed
    into place (also the file store's, filestore.py)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, Path):
                with open(data, "rb") as source:
                    shutil.copyfileobj(source, f, 1 << 20)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@dataclasses.dataclass
class Entry:
    sha256: str
    size: int
    name: str
    mime: str
    first_seen: str
    last_seen: str
    times_seen: int
    actions: list[str]
    rules: list[str]


class QuarantineStore:
    def __init__(self, root: Path, quarantine_settings: QuarantineSettings = QuarantineSettings()):
        self.root = Path(root)
        self.settings = quarantine_settings
        self._lock = threading.Lock()
        self.last_kept = 0          # files the last apply_retention kept past their limits (keep())
        if not self.root.parent.is_dir():       # the data folder: 0700 too, not the umask's mode
            from imguard.runtime import ensure_data_dir
            ensure_data_dir(self.root.parent)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)

    def _paths(self, sha256: str) -> tuple[Path, Path]:
        if not SHA256_RE.match(sha256):
            raise ValueError(f"not a SHA-256: {sha256!r}")
        folder = self.root / sha256[:2]
        return folder / sha256, folder / (sha256 + ".json")

    def put(self, data: bytes, report: FileReport, ctx: ChatContext, decision: Decision) -> Path:
        """Keep `data` (whose report is `report`) and record this sighting. Returns the stored path."""
        content_path, sidecar_path = self._paths(report.sha256)
        sighting = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "context": ctx.to_dict(), "decision": decision.to_dict()}
        with self._lock:
            content_path.parent.mkdir(exist_ok=True, mode=0o700)
            if not content_path.exists():
                write_atomic(content_path, data)
                self._ledger("put", report.sha256, len(data), sighting["time"])
            sidecar = self._read_sidecar(sidecar_path) or {"report": report.to_dict(), "sightings": []}
            # Bounded: the first sightings are the evidence; later ones are counted.
            if len(sidecar["sightings"]) < 100:
                sidecar["sightings"].append(sighting)
            sidecar["times_seen"] = sidecar.get("times_seen", 0) + 1
            sidecar["last_seen"] = sighting["time"]
            write_atomic(sidecar_path, json.dumps(sidecar, default=str, indent=1).encode())
        return content_path

    @staticmethod
    def _read_sidecar(path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _sidecars(self) -> Iterator[Path]:
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and len(folder.name) == 2:
                yield from sorted(folder.glob("*.json"))

    def entries(self) -> list[Entry]:
        result = []
        for sidecar_path in self._sidecars():
            sidecar = self._read_sidecar(sidecar_path)
            if not sidecar or not sidecar.get("sightings"):
                continue
            report, sightings = sidecar["report"], sidecar["sightings"]
            result.append(Entry(
                sha256=report["sha256"], size=report["size"], name=report["name"], mime=report["mime"],
                first_seen=sightings[0]["time"], last_seen=sidecar.get("last_seen", sightings[-1]["time"]),
                times_seen=sidecar.get("times_seen", len(sightings)),
                actions=sorted({s["decision"]["action"] for s in sightings}),
                rules=sorted({m["rule_id"] for s in sightings for m in s["decision"]["matches"]})))
        return result

    def show(self, sha256: str) -> dict[str, Any] | None:
        return self._read_sidecar(self._paths(sha256)[1])

    def read(self, sha256: str) -> bytes:
        return self._paths(sha256)[0].read_bytes()

    # --- the ledger ---------------------------------------------------------------------------------

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.jsonl"

    def _ledger(self, op: str, sha256: str, size: int, when: str, reason: str = "",
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
        from imguard.archive import GENESIS, link
        fd = os.open(self.ledger_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            seq, previous = 0, GENESIS
            last = _last_line(fd)
            if last:
                try:
                    entry = json.loads(last)
                    seq, previous = entry["seq"], entry["chain"]
                except (ValueError, KeyError, TypeError):
                    pass            # a damaged tail: verify reports it; the chain goes on from the start
            entry = {"seq": seq + 1, "time": when, "op": op, "sha256": sha256, "size": size, "reason": reason}
            if extra:
                entry["extra"] = extra
            entry["digest"] = _entry_digest(entry)
            entry["chain"] = link(previous, entry["digest"])
            os.write(fd, json.dumps(entry).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return entry

    def record_step(self, op: str, sha256: str, reason: str = "", **extra: Any) -> dict[str, Any]:
        """A step of the release workflow (imguard/console/release.py: release_request, release_approve, ...) on
        the ledger, chained like put and remove; `extra` (who, which request) is covered by the line's digest."""
        content_path = self._paths(sha256)[0]
        size = content_path.stat().st_size if content_path.exists() else 0
        return self._ledger(op, sha256, size,
                            datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            reason, extra)

    def ledger_entries(self) -> list[dict[str, Any]]:
        """The ledger's lines, oldest first (a line that is not JSON is skipped: verify() reports it)."""
        try:
            lines = self.ledger_path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries

    def verify(self) -> tuple[list[str], dict[str, int]]:
        """(problems, counts): the ledger's chain, and every file it says is kept, present with its SHA-256."""
        from imguard.archive import GENESIS, link
        problems: list[str] = []
        kept: dict[str, int] = {}
        removed = steps = 0
        previous, expected = GENESIS, 1
        try:
            lines = self.ledger_path.read_bytes().splitlines()
        except FileNotFoundError:
            lines = []
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                ok = (entry["seq"] == expected and _entry_digest(entry) == entry["digest"]
                      and link(previous, entry["digest"]) == entry["chain"])
            except (ValueError, KeyError, TypeError):
                entry, ok = {}, False
            if not ok:
                problems.append(f"quarantine ledger line {number} (seq {entry.get('seq', '?')}): altered, or a line "
                                "before it was removed")
                break
            previous, expected = entry["chain"], expected + 1
            if entry["op"] == "put":
                kept[entry["sha256"]] = number
            elif entry["op"] == "remove":
                kept.pop(entry["sha256"], None)
                removed += 1
            else:
                steps += 1          # a release step (imguard/console/release.py): chained, nothing to find on disk
        present = 0
        for sha256, number in sorted(kept.items(), key=lambda item: item[1]):
            content_path = self._paths(sha256)[0]
            try:
                digest = hashlib.sha256()
                with open(content_path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
            except FileNotFoundError:
                problems.append(f"quarantined file {sha256} (ledger line {number}): missing")
                continue
            if digest.hexdigest() != sha256:
                problems.append(f"quarantined file {sha256} (ledger line {number}): altered (its SHA-256 is now "
                                f"{digest.hexdigest()})")
                continue
            present += 1
        on_disk = {p.with_suffix("").name for p in self._sidecars()}
        counts = {"files verified": present, "files removed by retention": removed, "release steps": steps,
                  "files unchained (stored before the ledger)": len(on_disk - set(kept))}
        return problems, {k: v for k, v in counts.items() if v}

    def apply_retention(self, now: float | None = None,
                        keep: Callable[[dict[str, Any]], bool] | None = None) -> list[str]:
        """Delete files past the age limit, then the oldest until under the size limit, except those `keep`
        (given a file's sidecar) keeps: a legal hold or a minimum retention. Returns what went."""
        now = time.time() if now is None else now
        max_age = self.settings.quarantine_max_age_days * 86400
        stored = []
        for sidecar_path in self._sidecars():
            content_path = sidecar_path.with_suffix("")
            try:
                stat = content_path.stat()
            except FileNotFoundError:
                continue
            stored.append((stat.st_mtime, stat.st_size, content_path, sidecar_path))
        stored.sort()
        total = sum(size for _, size, _, _ in stored)
        removed = []
        self.last_kept = 0
        with self._lock:
            for mtime, size, content_path, sidecar_path in stored:
                if now - mtime <= max_age and total <= self.settings.quarantine_max_bytes:
                    continue
                if keep is not None and keep(self._read_sidecar(sidecar_path) or {}):
                    self.last_kept += 1
                    continue
                for path in (content_path, sidecar_path):
                    path.unlink(missing_ok=True)
                total -= size
                removed.append(content_path.name)
                self._ledger("remove", content_path.name, size,
                             datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             "age" if now - mtime > max_age else "size")
        return removed


def _entry_digest(entry: dict[str, Any]) -> str:
    fields = [entry.get(k) for k in ("seq", "time", "op", "sha256", "size", "reason")]
    if "extra" in entry:                # the release workflow's steps: who and which request, covered too
        fields.append(entry["extra"])
    return hashlib.sha256(json.dumps(fields, separators=(",", ":"), sort_keys=True).encode()).hexdigest()


def _last_line(fd: int) -> bytes:
    """The last complete line of the file open at `fd` (b"" when empty)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return b""
    chunk = 4096
    while True:
        start = max(0, size - chunk)
        data = os.pread(fd, size - start, start).rstrip(b"\n")
        cut = data.rfind(b"\n")
        if cut >= 0 or start == 0:
            return data[cut + 1:]
        chunk *= 4
