"""Local console accounts: DATA_DIR/console/users.json (0600), passwords hashed with Argon2id (argon2-cffi).

A role is a set of permissions (`ROLE_PERMISSIONS`), and a page asks for a permission, never for a role name:
auditor reads alerts and conversations and works the review queue (supervision); analyst also the quarantine (its
encrypted-zip download, release decisions) and the rule playground; admin also draws supervision samples and
manages users. Login throttling (`Throttle`) counts failures per account name and per client address.
"""

from __future__ import annotations

import enum
import json
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import argon2


class Permission(enum.Enum):
    READ_ALERTS = "read alerts"
    READ_CONVERSATIONS = "read conversations"
    READ_QUARANTINE = "read quarantine"
    DOWNLOAD_QUARANTINE = "download quarantined files"     # as an encrypted zip, for analysis
    DECIDE_RELEASE = "decide releases"
    USE_PLAYGROUND = "use the rule playground"
    REVIEW = "work the review queue"                       # supervision: dispositions, the trail, its export
    MANAGE_SUPERVISION = "draw supervision samples"        # draw a day's sample of conversations now
    MANAGE_USERS = "manage users"


class Role(enum.Enum):
    AUDITOR = "auditor"
    ANALYST = "analyst"
    ADMIN = "admin"


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.AUDITOR: frozenset({Permission.READ_ALERTS, Permission.READ_CONVERSATIONS, Permission.REVIEW}),
    Role.ANALYST: frozenset({Permission.READ_ALERTS, Permission.READ_CONVERSATIONS, Permission.READ_QUARANTINE,
                             Permission.DOWNLOAD_QUARANTINE, Permission.DECIDE_RELEASE, Permission.USE_PLAYGROUND,
                             Permission.REVIEW}),
    Role.ADMIN: frozenset(Permission),
}

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 10
_hasher = argon2.PasswordHasher()        # Argon2id with the library's (RFC 9106 low-memory) parameters


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    password_hash: str

    def can(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS[self.role]


class AccountError(ValueError):
    """A name, role or password the account store refuses; the message says why."""


class Accounts:
    """The account file, read at every login (an account added from the command line counts at once)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        # A hash to verify against when the name is unknown: the answer takes as long as for a known name.
        self._decoy = _hasher.hash(os.urandom(16).hex())

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return data.get("users", {}) if isinstance(data, dict) else {}

    def users(self) -> list[User]:
        return [User(name, Role(entry["role"]), entry["hash"]) for name, entry in sorted(self._read().items())]

    def get(self, name: str) -> User | None:
        entry = self._read().get(name)
        return User(name, Role(entry["role"]), entry["hash"]) if entry else None

    def add(self, name: str, role: Role, password: str, replace: bool = False) -> User:
        if not NAME_RE.match(name):
            raise AccountError(f"{name!r} is not an account name (letters, digits, . _ @ -; at most 64)")
        if len(password) < MIN_PASSWORD:
            raise AccountError(f"the password must have at least {MIN_PASSWORD} characters")
        with self._lock:
            users = self._read()
            if name in users and not replace:
                raise AccountError(f"{name!r} exists (--replace to set a new role and password)")
            users[name] = {"role": role.value, "hash": _hasher.hash(password)}
            self._write(users)
        return User(name, role, users[name]["hash"])

    def _write(self, users: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".users-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"users": users}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def verify(self, name: str, password: str) -> User | None:
        """The user when `password` is theirs, else None (in about the same time either way)."""
        user = self.get(name)
        try:
            _hasher.verify(user.password_hash if user else self._decoy, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return None
        return user


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0
    last: float = 0.0


class Throttle:
    """Login throttling: after `free` failures for one key (an account name, a client address), each further
    failure locks that key for `base` seconds, doubled per failure up to `cap`; a success clears the name's
    count. A locked key is refused before its password is even checked. Failures are forgotten after `forget`
    seconds of quiet."""

    def __init__(self, free: int = 5, base: float = 30.0, cap: float = 900.0, forget: float = 3600.0,
                 clock=time.monotonic):
        self.free, self.base, self.cap, self.forget, self.clock = free, base, cap, forget, clock
        self._keys: dict[str, _Failures] = {}
        self._lock = threading.Lock()

    def wait(self, *keys: str) -> float:
        """Seconds until every key may try again (0: now)."""
        now = self.clock()
        with self._lock:
            return max([self._keys[k].locked_until - now for k in keys if k in self._keys] + [0.0])

    def failed(self, *keys: str) -> None:
        now = self.clock()
        with self._lock:
            for key in keys:
                entry = self._keys.get(key)
                if entry is None or now - entry.last > self.forget:
                    entry = self._keys[key] = _Failures()
                entry.count += 1
                entry.last = now
                if entry.count >= self.free:
                    entry.locked_until = now + min(self.cap, self.base * 2 ** (entry.count - self.free))
            if len(self._keys) > 100_000:       # bounded: forget the quiet ones
                for key in [k for k, e in self._keys.items() if now - e.last > self.forget]:
                    del self._keys[key]

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._keys.pop(key, None)
