"""Encrypted 7z and RAR, opened with the passwords an encrypted zip gets (passwords.Candidate), by external tools.

libarchive reads plain 7z and RAR (archives.walk_libarchive) but decrypts neither. When one of them is encrypted,
`walk()` takes over, with the tools Debian ships:

    7z   AES-256 (data, and headers: `-mhe`, names hidden)   7-Zip's `7zz` (package 7zip)
    RAR  RAR5 AES-256 (data, and headers: `-hp`)              The Unarchiver's `lsar` and `unar` (package unar)

RAR 2.9/3.x/4 encryption (AES-128) is listed by unar 1.10 but not decrypted (it fails with the right password too):
those members stay locked, as they do when a tool is missing (then libarchive walks the archive as before).

The tools read attacker input, so each run is confined: `prlimit` caps its address space (archive_tool_memory),
CPU seconds and the size of any file it writes; it runs in a fresh private temporary folder, in its own process
group, killed at archive_tool_timeout or as soon as its output passes the byte cap (the file's decompression
budget, max_file_size per member, max_compression_ratio against the whole archive, as for libarchive).

    7z   the listing (`7zz l -slt`, control characters shown as '_') gives names, sizes, CRC-32s and which entries
         are encrypted; one `7zz x -so` streams every file into memory, split by the listed sizes, each piece
         checked against its listed CRC-32 (so a wrong split or a wrong password is never scanned as the content).
         The password is written to 7zz's standard input, never put on its command line. Nothing is written.
    RAR  the listing (`lsar -j`, JSON) gives the same; each file is extracted on its own (`unar -i INDEX`) into an
         empty folder, and counts only if unar says it succeeded (it checks the CRC or RAR5's keyed checksum) and
         the size is the listed one. unar has no other way to take a password than `-p`: it is on that short-lived
         process's command line (visible in /proc to local users of the gateway host), never logged; RAR5's
         password check value (in the listing) turns wrong candidates away first, in Python, without a run. A name
         that would leave the folder (`..`, absolute) is not extracted.

A run that reaches archive_tool_timeout ends the tries for that archive: its members are a limit hit, not locked.

A member no password opens stays UNSCANNABLE encrypted with SEVEN_LOCKED / RAR_LOCKED as its detail (counted by
passwords.locked_members, so the pipeline tries the conversation's passwords, as for zip); an archive whose names
are encrypted is one such member, HIDDEN_NAMES. The Candidate that opened a member is its `opened_with`. A RAR5
member whose password check value accepts a candidate but that unar still fails to extract is UNSCANNABLE corrupt
(RAR_FAILED), not locked: it has its password, and no other would open it. unar 1.10 does that to a member whose
compressed data ends on the last bit of its last AES block (tests/data/encrypted/README.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from imguard.inspect.archives import RATIO_MIN_BYTES, Budget, Container, Member, unsafe_name
from imguard.model import REASON_CORRUPT, REASON_ENCRYPTED, REASON_LIMIT, REASON_TOO_LARGE

SEVEN_LOCKED = "encrypted 7z member cannot be read"
RAR_LOCKED = "encrypted rar member cannot be read"
RAR_FAILED = "rar member unreadable: unar failed with the password its check value accepts"
HIDDEN_NAMES = "<encrypted names>"          # the one member of an archive whose names no password opened
DEFAULT_TIMEOUT, DEFAULT_MEMORY = 20.0, 1024 * 1024 * 1024
_SEVEN_TOOLS, _RAR_LISTER, _RAR_EXTRACTOR = ("7zz",), "lsar", "unar"


@dataclass
class Entry:
    index: int
    name: str
    size: int
    encrypted: bool
    crc: int | None = None          # 7z: the listed CRC-32 (None: none listed)
    check: tuple[bytes, bytes, int] | None = None   # RAR5: (salt, password check value, log2 of the KDF rounds)


@dataclass
class Run:
    returncode: int | None          # None: killed (timeout or cap)
    out: bytes
    err: str
    stopped: str = ""               # "", "timeout", "cap", "ratio", "mismatch" (the `first` check failed)


class _Limits:
    def __init__(self, limits: Any) -> None:
        self.timeout = float(getattr(limits, "archive_tool_timeout", DEFAULT_TIMEOUT) or DEFAULT_TIMEOUT)
        self.memory = int(getattr(limits, "archive_tool_memory", DEFAULT_MEMORY) or DEFAULT_MEMORY)


def _which(*names: str) -> str | None:
    for name in names:
        if found := shutil.which(name):
            return found
    return None


def walk(data: bytes, fmt: str, budget: Budget, max_file_size: int, max_ratio: int, container: Container,
         passwords: Sequence[Any], limits: Any = None) -> list[Member] | None:
    """The members of an encrypted 7z or RAR, opened where one of `passwords` does; None when the archive is not
    encrypted, cannot be listed, or its tool is missing (libarchive walks it then, as before)."""
    if fmt not in ("7z", "rar") or _which("prlimit") is None:
        return None
    tool = _which(*_SEVEN_TOOLS) if fmt == "7z" else (_which(_RAR_LISTER) and _which(_RAR_EXTRACTOR))
    if tool is None:
        return None
    reader = _SevenZip if fmt == "7z" else _Rar
    with tempfile.TemporaryDirectory(prefix="imguard-enc-") as tmp:
        os.chmod(tmp, 0o700)
        archive = Path(tmp) / f"archive.{fmt}"      # alone in its folder: unar looks for volumes beside it
        archive.write_bytes(data)
        return reader(archive, len(data), budget, max_file_size, max_ratio, container, passwords,
                      _Limits(limits)).members()


# --- the confined run -------------------------------------------------------------------------------------------

def run_confined(argv: list[str], cwd: Path, limits: _Limits, stdin: bytes = b"", cap: int = 1 << 20,
                 packed: int = 0, max_ratio: int = 0, fsize: int = 0, first: tuple[int, int] | None = None) -> Run:
    """Run `argv` under prlimit (address space, CPU seconds, written file size `fsize`, no core), in `cwd`, with a
    minimal environment, in its own process group; standard output read into memory up to `cap` bytes (and, with
    `max_ratio`, `max_ratio` times `packed` past RATIO_MIN_BYTES); the group is killed at the cap or the timeout, or
    (`first` = (size, CRC-32)) as soon as the first `size` bytes are not those: a wrong password costs no more."""
    cpu = max(1, int(limits.timeout + 1))
    confined = [_which("prlimit") or "prlimit", f"--as={limits.memory}", f"--cpu={cpu}", f"--fsize={fsize}",
                "--core=0", "--nofile=256", "--", *argv]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(cwd), "TMPDIR": str(cwd)}
    proc = subprocess.Popen(confined, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    out, err, total, stopped = [], [], 0, ""
    deadline = time.monotonic() + limits.timeout
    try:
        try:
            proc.stdin.write(stdin)
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, out)
            sel.register(proc.stderr, selectors.EVENT_READ, err)
            while sel.get_map() and not stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    stopped = "timeout"
                    break
                for key, _ in sel.select(min(left, 1.0)):
                    piece = os.read(key.fd, 256 * 1024)
                    if not piece:
                        sel.unregister(key.fileobj)
                        continue
                    if key.data is err:
                        if sum(map(len, err)) < 64 * 1024:
                            err.append(piece)
                        continue
                    out.append(piece)
                    total += len(piece)
                    if total > cap:
                        stopped = "cap"
                    elif max_ratio and total > RATIO_MIN_BYTES and total > max_ratio * max(packed, 1):
                        stopped = "ratio"
                    if first is not None and total >= first[0]:
                        if zlib.crc32(b"".join(out)[:first[0]]) != first[1]:
                            stopped = "mismatch"
                        first = None
        if stopped:
            _kill(proc)
        try:
            returncode = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stopped = stopped or "timeout"
            _kill(proc)
            proc.wait()
            returncode = None
    finally:
        if proc.poll() is None:
            _kill(proc)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return Run(None if stopped else returncode, b"".join(out), b"".join(err).decode("utf-8", "replace"), stopped)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)       # our own child's group (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


# --- the two formats ------------------------------------------------------------------------------------------

class _Reader:
    FORMAT = ""
    LOCKED = ""

    def __init__(self, archive: Path, packed: int, budget: Budget, max_file_size: int, max_ratio: int,
                 container: Container, passwords: Sequence[Any], limits: _Limits) -> None:
        self.archive, self.packed, self.budget = archive, packed, budget
        self.max_file_size, self.max_ratio, self.container = max_file_size, max_ratio, container
        self.passwords, self.limits = list(passwords), limits
        self.folder = archive.parent
        self.timed_out = False      # a run reached archive_tool_timeout: no more runs for this archive

    def members(self) -> list[Member] | None:
        raise NotImplementedError

    def _locked(self, name: str, size: int) -> Member:
        return Member(name, None, size, encrypted=True, problem=(REASON_ENCRYPTED, self.LOCKED))

    def _timeout(self, entry: Entry) -> Member:
        """Not read: a run of the tool reached archive_tool_timeout (a limit hit, not a locked member: trying more
        passwords would only take as long)."""
        return Member(entry.name, None, entry.size, entry.encrypted, problem=(
            REASON_LIMIT, f"{self.FORMAT} member not read: the tool ran past archive_tool_timeout"),
            limit=("archive_tool_timeout", int(self.limits.timeout)))

    def _take(self, entry: Entry) -> bool:
        """Count a member against the budget; False (and the limit recorded) when none is left."""
        if self.budget.members_left <= 0:
            self.container.limits.append(("max_archive_members", 0, "members left uninspected"))
            return False
        self.budget.members_left -= 1
        if why := unsafe_name(entry.name):
            self.container.unsafe.append((entry.name, why))
        return True

    def _member(self, entry: Entry, content: bytes, opened_with: Any) -> Member:
        """A member read whole (its data checked), under max_file_size and the expansion budget."""
        cap = min(self.budget.bytes_left, self.max_file_size)
        encrypted = entry.encrypted
        if len(content) > cap:
            content = content[:cap]
            self.budget.bytes_left -= len(content)
            if cap == self.max_file_size:
                return Member(entry.name, content, len(content), encrypted, True,
                              (REASON_TOO_LARGE, f"expands past {self.max_file_size} bytes"),
                              ("max_file_size", self.max_file_size), opened_with)
            return Member(entry.name, content, len(content), encrypted, True,
                          (REASON_LIMIT, "the decompression budget of the file ran out"),
                          ("max_expanded_bytes", cap), opened_with)
        self.budget.bytes_left -= len(content)
        return Member(entry.name, content, len(content), encrypted, opened_with=opened_with)


class _SevenZip(_Reader):
    FORMAT, LOCKED = "7z", SEVEN_LOCKED

    def _list(self, password: str) -> tuple[list[Entry] | None, str]:
        run = run_confined([_which(*_SEVEN_TOOLS), "l", "-slt", "-bd", "--", self.archive.name], self.folder,
                           self.limits, stdin=password.encode() + b"\n", cap=16 * 1024 * 1024)
        if run.returncode != 0:
            return None, run.err.strip().splitlines()[-1] if run.err.strip() else f"7zz exit {run.returncode}"
        return parse_7z_listing(run.out.decode("utf-8", "replace")), ""

    def members(self) -> list[Member] | None:
        entries, _ = self._list("")
        opened_names = None
        candidates = self.passwords
        if entries is None:
            if not headers_encrypted(self.archive.read_bytes()):
                return None                 # not ours: libarchive says what is wrong with it
            for candidate in self.passwords:
                entries, _ = self._list(candidate.password)
                if entries is not None:
                    opened_names = candidate
                    candidates = [candidate] + [c for c in self.passwords if c is not candidate]
                    break
            else:
                if self.budget.members_left <= 0:
                    return []
                self.budget.members_left -= 1
                return [self._locked(HIDDEN_NAMES, 0)]
        if opened_names is None and not any(e.encrypted for e in entries):
            return None
        for candidate in candidates:
            found = self._extract(entries, candidate)
            if found is not None:
                return found
            if self.timed_out:
                break
        out = []
        for entry in entries:
            if not self._take(entry):
                break
            if self.timed_out:
                out.append(self._timeout(entry))
            elif entry.encrypted:
                out.append(self._locked(entry.name, entry.size))
            else:
                out.append(Member(entry.name, None, entry.size, problem=(
                    REASON_ENCRYPTED, "7z member not read: others in the archive are encrypted and no password "
                                      "opened them")))
        return out

    def _extract(self, entries: list[Entry], candidate: Any) -> list[Member] | None:
        """Every file of the archive with this password, or None when it is not the password."""
        cap = self.budget.bytes_left
        head = next((e for e in entries if e.size), None)
        first = (head.size, head.crc) if head is not None and head.encrypted and head.crc is not None \
            and head.size <= cap else None
        run = run_confined([_which(*_SEVEN_TOOLS), "x", "-so", "-bd", "-y", "--", self.archive.name], self.folder,
                           self.limits, stdin=candidate.password.encode() + b"\n", cap=cap, packed=self.packed,
                           max_ratio=self.max_ratio, first=first)
        if run.stopped == "mismatch":
            return None                     # the first file is not what the listing says: not the password
        if run.stopped == "timeout" and not run.out:
            self.timed_out = True
            return None
        # A wrong password makes 7zz fail ("Wrong password?") after writing garbage: a piece counts only if its
        # CRC-32 is the listed one, and the password only if an encrypted piece does (or 7zz read all, unchecked).
        out, offset, verified, members = run.out, 0, False, []
        for entry in entries:
            piece = out[offset:offset + entry.size]
            complete = len(piece) == entry.size
            if complete and entry.crc is not None and entry.size:
                if zlib.crc32(piece) != entry.crc:
                    return None             # garbage: a wrong password (or a wrong split)
                verified |= entry.encrypted
            if not complete:
                break
            offset += entry.size
        whole = run.returncode == 0 and offset == len(out) and offset == sum(e.size for e in entries)
        # Cut at the byte cap or the ratio before any encrypted piece was complete, 7zz not having failed: a wrong
        # password fails at once on compressed data, and on stored data its garbage is as long as the content, so
        # the limit is hit whatever the password. The members are limit hits, their password not named.
        cut = run.stopped in ("cap", "ratio") and "error" not in run.err.lower()
        if not verified and not (whole and any(e.encrypted for e in entries)):
            if not cut:
                return None
            candidate = None
        offset = 0
        for entry in entries:
            if not self._take(entry):
                break
            piece = out[offset:offset + entry.size]
            offset += entry.size
            opened = candidate if entry.encrypted else None
            if len(piece) == entry.size:
                members.append(self._member(entry, piece, opened))
                continue
            # Cut by a limit, the timeout or an error: what was read is scanned, the rest reported.
            self.budget.bytes_left -= len(piece)
            if run.stopped == "ratio":
                problem, limit = (REASON_LIMIT, f"7z data expands more than {self.max_ratio}:1 (a decompression "
                                                f"bomb?)"), ("max_compression_ratio", self.max_ratio)
            elif run.stopped == "cap":
                problem, limit = (REASON_LIMIT, "the decompression budget of the file ran out"), \
                    ("max_expanded_bytes", cap)
            elif run.stopped == "timeout":
                problem, limit = (REASON_LIMIT, f"7zz ran past archive_tool_timeout ({self.limits.timeout} s)"), \
                    ("archive_tool_timeout", int(self.limits.timeout))
            else:
                problem, limit = (REASON_CORRUPT, f"7z member unreadable: {_last_line(run.err)}"), None
            members.append(Member(entry.name, piece or None, entry.size, entry.encrypted, bool(piece), problem,
                                  limit, opened))
            if limit is not None:
                self.container.limits.append((limit[0], limit[1], "walk stopped at a limit"))
                break
            for rest in entries[entries.index(entry) + 1:]:     # 7zz stopped before them: none is clean
                if not self._take(rest):
                    break
                members.append(self._locked(rest.name, rest.size) if rest.encrypted else Member(
                    rest.name, None, rest.size, problem=(REASON_CORRUPT, "7z member not read: 7zz stopped before it")))
            break
        return members


def headers_encrypted(data: bytes) -> bool:
    """Whether a 7z's header is encrypted (-mhe): its next header is an encoded header (0x17) whose coders include
    7zAES (06 F1 07 01), both in clear in the file; 7zz's message for it varies ("Cannot open encrypted archive",
    "Headers Error")."""
    if len(data) < 32 or not data.startswith(b"7z\xbc\xaf\x27\x1c"):
        return False
    offset, size = struct.unpack_from("<QQ", data, 12)
    header = data[32 + offset:32 + offset + min(size, 4096)] if 32 + offset < len(data) else b""
    return header[:1] == b"\x17" and b"\x06\xf1\x07\x01" in header


def parse_7z_listing(text: str) -> list[Entry] | None:
    """The files of `7zz l -slt` (directories left out), in archive order (the order of `x -so`)."""
    _, sep, body = text.partition("\n----------\n")
    if not sep:
        return None
    entries: list[Entry] = []
    for block in body.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, eq, value = line.partition(" = ")
            if eq:
                if key in fields:
                    return None             # a block that repeats a field: not a listing we trust
                fields[key] = value
            elif line.rstrip().endswith("=") and " " in line:
                fields[line.rstrip()[:-1].strip()] = ""
        if "Path" not in fields:
            continue
        if "D" in fields.get("Attributes", "").split(" ", 1)[0] or fields.get("Folder") == "+":
            continue
        try:
            size = int(fields.get("Size") or 0)
            crc = int(fields["CRC"], 16) if fields.get("CRC") else None
        except ValueError:
            return None
        entries.append(Entry(len(entries), fields["Path"], size, fields.get("Encrypted") == "+", crc))
    return entries


MAX_RAR5_KDF_LOG2 = 18      # RAR uses 15 (32768 rounds, ~10 ms here); past this the check is left to unar


def _rar5_check(item: dict) -> tuple[bytes, bytes, int] | None:
    """A RAR5 member's password check data from lsar's listing (binary strings as code points 0-255)."""
    try:
        if not item.get("XADIsEncrypted") or not int(item.get("RAR5EncryptionFlags", 0)) & 1:
            return None
        salt = str(item["RAR5EncryptionSalt"]).encode("latin-1")
        check = str(item["RAR5EncryptionCheckData"]).encode("latin-1")[:8]
        strength = int(item["RAR5EncryptionStrength"])
    except (KeyError, ValueError, UnicodeError, TypeError):
        return None
    if len(salt) != 16 or len(check) != 8 or not 0 < strength <= MAX_RAR5_KDF_LOG2:
        return None
    return salt, check, strength


def rar5_password_matches(password: str, salt: bytes, check: bytes, strength: int) -> bool:
    """RAR5's password check (RARLAB's RAR 5.0 archive format, "Archive encryption header"): PBKDF2-HMAC-SHA256 of
    the password with 2^strength + 32 rounds, its 32 bytes XOR-folded into 8, equal to the stored check value. A
    wrong password is refused in milliseconds instead of a unar run (about 0.4 s)."""
    value = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, (1 << strength) + 32)
    folded = bytearray(8)
    for i, byte in enumerate(value):
        folded[i % 8] ^= byte
    return bytes(folded) == check


def rar_headers_encrypted(data: bytes) -> bool:
    """Whether a RAR's headers (names) are encrypted (-hp): RAR5's first block is an archive encryption header
    (type 4); RAR 1.5-4's main header has the 0x0080 flag."""
    if data.startswith(b"Rar!\x1a\x07\x01\x00"):
        pos = 12                            # past the signature and the block's CRC-32
        for _ in range(2):                  # the header size, then the header type (vints)
            value, shift = 0, 0
            while pos < len(data) and shift < 64:
                byte = data[pos]
                pos += 1
                value |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
        return value == 4
    if data.startswith(b"Rar!\x1a\x07\x00") and len(data) >= 14:
        return data[9] == 0x73 and bool(struct.unpack_from("<H", data, 10)[0] & 0x0080)
    return False


class _Rar(_Reader):
    FORMAT, LOCKED = "rar", RAR_LOCKED
    _checked: dict

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._checked = {}

    def _list(self, password: str | None) -> tuple[list[Entry] | None, int]:
        argv = [_which(_RAR_LISTER), "-j", "-nr"] + (["-p", password] if password is not None else []) + \
            ["--", self.archive.name]
        run = run_confined(argv, self.folder, self.limits, cap=16 * 1024 * 1024)
        try:
            listing = json.loads(run.out.decode("utf-8", "replace"))
        except ValueError:
            return None, -1                 # no JSON: it asked for a password (encrypted names), or died
        error = int(listing.get("lsarError") or 0)
        entries = []
        for item in listing.get("lsarContents", []):
            if item.get("XADIsDirectory") or item.get("XADIsLink") or item.get("XADIsResourceFork"):
                continue
            entries.append(Entry(int(item.get("XADIndex", -1)), str(item.get("XADFileName", "")),
                                 int(item.get("XADFileSize") or 0), bool(item.get("XADIsEncrypted")),
                                 check=_rar5_check(item)))
        return (entries if not error or entries else None), error

    def members(self) -> list[Member] | None:
        entries, _ = self._list(None)
        names_with = None
        candidates = list(self.passwords)
        if entries is None:
            if not rar_headers_encrypted(self.archive.read_bytes()):
                return None                 # unreadable for lsar too: libarchive says why
            for candidate in self.passwords:
                entries, _ = self._list(candidate.password)
                if entries:
                    names_with = candidate
                    candidates = [candidate] + [c for c in self.passwords if c is not candidate]
                    break
            else:
                if self.budget.members_left <= 0:
                    return []
                self.budget.members_left -= 1
                return [self._locked(HIDDEN_NAMES, 0)]
        if names_with is None and not any(e.encrypted for e in entries):
            return None
        members: list[Member] = []
        runs_left = len(entries) + len(candidates) + 4      # wrong passwords cost one run each, not one per member
        good: list[Any] = []
        for entry in entries:
            if not self._take(entry):
                break
            if self.timed_out:
                members.append(self._timeout(entry))
                continue
            if unsafe_name(entry.name) or entry.index < 0:
                members.append(Member(entry.name, None, entry.size, entry.encrypted, problem=(
                    REASON_CORRUPT, "rar member not extracted: its name leaves the extraction folder")))
                continue
            if not entry.encrypted:
                member = self._extract(entry, names_with)
                members.append(member if member is not None else self._timeout(entry) if self.timed_out
                               else Member(entry.name, None, entry.size, problem=(
                                   REASON_CORRUPT, "rar member unreadable (unar failed)")))
                continue
            opened = accepted = None
            for candidate in good + [c for c in candidates if c not in good]:
                if entry.check is not None and not self._checks(candidate.password, entry.check):
                    continue                # RAR5's password check value says no: no unar run for it
                if runs_left <= 0:
                    break
                runs_left -= 1
                opened = self._extract(entry, candidate)
                if opened is not None:
                    if candidate not in good:
                        good.insert(0, candidate)
                    break
                if entry.check is not None:
                    accepted = candidate    # its password (the check value says so): unar fails on the member
                    break
            members.append(opened if opened is not None else self._timeout(entry) if self.timed_out
                           else self._failed(entry) if accepted is not None else self._locked(entry.name, entry.size))
        return members

    def _failed(self, entry: Entry) -> Member:
        """Its password found, unar failed to extract it all the same: unscannable (corrupt), not locked (another
        password would not help, so the pipeline does not wait for one)."""
        return Member(entry.name, None, entry.size, True, problem=(REASON_CORRUPT, RAR_FAILED))

    def _checks(self, password: str, check: tuple[bytes, bytes, int]) -> bool:
        key = (password, *check)
        if key not in self._checked:
            self._checked[key] = rar5_password_matches(password, *check)
        return self._checked[key]

    def _extract(self, entry: Entry, candidate: Any) -> Member | None:
        """One member with this password (None: unar failed, a wrong password among other things)."""
        cap = min(self.budget.bytes_left, self.max_file_size)
        target = Path(tempfile.mkdtemp(prefix="m", dir=self.folder))
        try:
            argv = [_which(_RAR_EXTRACTOR), "-nr", "-q", "-f", "-D", "-k", "skip", "-o", target.name] + \
                (["-p", candidate.password] if candidate is not None else []) + \
                ["-i", "--", self.archive.name, str(entry.index)]
            run = run_confined(argv, self.folder, self.limits, cap=64 * 1024, fsize=cap + 1)
            if run.stopped == "timeout":
                self.timed_out = True
                return None
            files = [p for p in target.rglob("*") if p.is_file() and not p.is_symlink()]
            if len(files) != 1:
                return None
            size = files[0].stat().st_size
            if size > cap:                  # stopped by the file size limit: a bomb, or a big member
                with files[0].open("rb") as f:
                    content = f.read(cap + 1)
                verified = entry.encrypted and entry.check is not None      # else unar checked nothing yet
                return self._member(entry, content, candidate if verified else None)
            if run.returncode != 0 or size != entry.size:
                return None
            return self._member(entry, files[0].read_bytes(), candidate if entry.encrypted else None)
        finally:
            shutil.rmtree(target, ignore_errors=True)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "the tool failed"
