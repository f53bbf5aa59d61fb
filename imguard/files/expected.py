"""The expected-transfers table: what a control channel announced, waiting for its data.

A chat protocol often negotiates a file on one connection and moves the bytes on another (XEP-0363
HTTP upload, XEP-0065 SOCKS5 bytestreams, IRC DCC). The session that sees the announcement writes it
here; the carrier that sees the data connection (the gateway's HTTP addon, the SOCKS5 relay, a DCC
listener) reads it back and so knows whose file it is and what it claimed to be. Like Zeek's
`dcc-send.zeek` table, entries expire (`ttl_seconds`) and the table is bounded (`max_entries`,
oldest evicted first), so a chatty or hostile client cannot grow it.

Keys are any hashable value within a *kind* (a namespace): XMPP uses the PUT URL ("upload"), the
GET URL ("blocked_url"), the GET URL of a file shared *with* its user ("download": an XEP-0066 OOB link or an
XEP-0363 URL in a Jingle offer that the server delivered, so the gateway's HTTP side holds and scans that GET's
response) and the SOCKS5 destination hash ("bytestream"); IRC DCC uses (host, port). The table is shared by all
connections and used from the event loop and worker threads, so every method takes one lock.

Two implementations of one interface (expect / get / take / discard and the typed helpers of `_Typed`), chosen by
the gateway's `transfer_store` setting (`open_transfers`):
- `ExpectedTransfers`, in memory: one process (one worker, the offline replay, a session's own id table).
- `SharedTransfers`, in SQL: a side connection may land on another worker or gateway host than the chat connection
  that announced it (the kernel spreads connections over workers, a load balancer over hosts), so every process
  reads and writes one table: SQLite in the data folder for the workers of one host (`sqlite`), the PostgreSQL
  server of the archive for several hosts (a connection string). Same keys and kinds; values are pickled and read
  back only as imguard's own types; deadlines are wall-clock; `take` is one DELETE ... RETURNING (one winner).
  A store that fails raises TransferStoreError, which callers must never read as "not announced": the HTTP carrier
  follows the `store` fail mode (closed: 503 with a notice), a chat session fails closed like any session error, a
  relay lookup refuses the connection.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Hashable
from urllib.parse import urlsplit, urlunsplit

from imguard.model import ChatContext
from imguard.settings import setting

UPLOAD = "upload"
BLOCKED_URL = "blocked_url"
BYTESTREAM = "bytestream"
DOWNLOAD = "download"
NOTICE = "notice"            # a notice for a chat connection another worker or gateway holds


@dataclass(frozen=True)
class TransferSettings:
    """Expected-transfers table."""

    max_entries: int = setting(100_000, "Most announced transfers remembered at once (all kinds together); "
                               "the oldest is forgotten first. Each entry is a few hundred bytes.")
    ttl_seconds: float = setting(900.0, "Seconds an announced upload slot or bytestream waits for its data "
                                 "connection, and a link shared with a user is held and scanned when fetched. "
                                 "XEP-0363 servers typically expire slots within minutes.")
    blocked_url_ttl_seconds: float = setting(7 * 86400.0, "Seconds a download URL of a blocked upload stays "
                                             "blocked, so a message pasting it later is still stopped.")


@dataclass(frozen=True)
class ExpectedUpload:
    """An XEP-0363 upload slot: the client asked for it, the server granted it."""
    put_url: str
    get_url: str
    name: str
    size: int | None
    content_type: str
    context: ChatContext                     # who asked (sender, connection, addresses)
    put_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ExpectedDownload:
    """A file shared with the user behind the gateway by a link (an XEP-0066 OOB URL, an XEP-0363 GET URL in a
    Jingle offer): the response to a GET of `url` is the file, coming in. `context` is the file's: its sender
    (the party who shared it), the receiver (our user), origin FROM_SERVER, the chat connection to tell."""
    url: str
    name: str
    size: int | None
    content_type: str
    context: ChatContext


@dataclass(frozen=True)
class StreamHost:
    jid: str
    host: str
    port: int


@dataclass(frozen=True)
class ExpectedBytestream:
    """An XEP-0065 SOCKS5 bytestream offer, keyed by its destination hash."""
    dst_hash: str                            # hex SHA1(sid + initiator full JID + target full JID)
    sid: str
    initiator: str                           # full JIDs
    target: str
    streamhosts: tuple[StreamHost, ...]      # the real ones, in the order offered
    context: ChatContext
    name: str = ""
    size: int | None = None
    content_type: str = ""

    @property
    def host(self) -> str:
        """The first real streamhost's address: where a relay connection for this hash should go."""
        return self.streamhosts[0].host if self.streamhosts else ""

    @property
    def port(self) -> int:
        return self.streamhosts[0].port if self.streamhosts else 0


def normalize_url(url: str) -> str:
    """The form URLs are compared in: no fragment (XEP-0454 puts the key there), aesgcm:// read as https://."""
    url = url.strip()
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    scheme = "https" if parts.scheme.lower() == "aesgcm" else parts.scheme.lower()
    return urlunsplit((scheme, parts.netloc.lower(), parts.path, parts.query, ""))


_DEFAULT_PORTS = {"http": 80, "https": 443}


def url_origin(url: str) -> str:
    """scheme://host:port of `url` (the port always written, the host in lower case), or '' when it has none."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return ""
    if not parts.hostname or not port:
        return ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme.lower()}://{host.lower()}:{port}"


def parse_upload_relays(entries) -> dict[str, str]:
    """The upload relays setting (PUBLIC=UPSTREAM, each an origin) as {upstream origin: public origin}; ValueError
    names the entry that is not two origins."""
    relays = {}
    for entry in entries or ():
        public, sep, upstream = str(entry).partition("=")
        if not sep or not url_origin(public) or not url_origin(upstream):
            raise ValueError(f"upload_relay {entry!r}: expected PUBLIC=UPSTREAM, two origins such as "
                             "https://gw.example.org:5443=https://upload.example.org:5281")
        relays[url_origin(upstream)] = url_origin(public)
    return relays


def upload_relay_url(put_url: str, relays) -> str | None:
    """The PUT URL a client is given for `put_url` when an upload relay covers its origin (the same path and query
    on the relay's origin), else None. `relays`: the setting's entries (invalid ones cover nothing)."""
    try:
        table = parse_upload_relays(relays)
    except ValueError:
        return None
    return relayed_url(put_url, table)


def relayed_url(url: str, table: dict[str, str]) -> str | None:
    """`url` on its upload relay's origin (the same path, query and fragment) when a relay of `table`
    (parse_upload_relays) covers its origin, else None."""
    public = table.get(url_origin(url))
    if public is None:
        return None
    parts = urlsplit(url.strip())
    return (public + parts.path + (f"?{parts.query}" if parts.query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


class Listener(Enum):
    """How a chat connection reached the gateway: the kind of listener it arrived on, told to the session by the
    carrier (the gateway adapter reads it from the mitmproxy mode). It says whether the client's HTTP to an upload
    service crosses the gateway too, so whether a granted upload slot can be scanned without a relay."""
    TRANSPARENT = "transparent"     # redirected to the gateway (transparent, wireguard, local, tun): its HTTP is too
    PROXY = "proxy"                 # the client's explicit proxy (regular, socks5, upstream): its HTTP may use it too
    REVERSE = "reverse"             # the client connects to the gateway as to its server: its HTTP goes straight
                                    # to the upload service, around the gateway
    NONE = "none"                   # no listener: the offline replay, a test (nothing to refuse)

    @classmethod
    def of_mode(cls, type_name: str) -> "Listener":
        """The listener of a mitmproxy mode (`ProxyMode.type_name`); an unknown mode is REVERSE, whose HTTP the
        gateway cannot assume it sees."""
        return _LISTENERS.get(type_name, cls.REVERSE)


_LISTENERS = {"transparent": Listener.TRANSPARENT, "wireguard": Listener.TRANSPARENT, "local": Listener.TRANSPARENT,
              "tun": Listener.TRANSPARENT, "regular": Listener.PROXY, "socks5": Listener.PROXY,
              "upstream": Listener.PROXY, "reverse": Listener.REVERSE}

REFUSE_AUTO, REFUSE_ALWAYS, REFUSE_NEVER = "auto", "always", "never"
UPLOAD_REFUSALS = (REFUSE_AUTO, REFUSE_ALWAYS, REFUSE_NEVER)


def check_upload_refusal(value: str, name: str = "upload_refuse_unrelayed") -> str:
    """An auto|always|never setting (`name`), checked (ValueError names the choices)."""
    if value not in UPLOAD_REFUSALS:
        raise ValueError(f"{name} {value!r}: expected one of {', '.join(UPLOAD_REFUSALS)}")
    return value


def http_goes_around(value: str, listener: Listener) -> bool:
    """An auto|always|never setting about a client whose HTTP goes around the gateway (upload_refuse_unrelayed,
    upload_relay_links), for a session that arrived on `listener`: `always` and `never` say so; `auto` means a
    reverse listener (its client reaches the upload service directly). An unknown value is `always`: the settings
    are checked at start, and failing closed never lets a file go unscanned."""
    if value == REFUSE_NEVER:
        return False
    if value == REFUSE_AUTO:
        return listener is Listener.REVERSE
    return True


def refuses_unrelayed(refusal: str, listener: Listener) -> bool:
    """Is an upload slot no relay covers refused (upload_refuse_unrelayed), for a session that arrived on
    `listener`?"""
    return http_goes_around(refusal, listener)


class _Typed:
    """The typed announcements, written once over the generic expect/get/take of either table."""

    settings: TransferSettings
    any_blocked_urls: bool

    def expect(self, key: Hashable, value: Any, kind: str = "", ttl: float | None = None) -> None:
        raise NotImplementedError

    def get(self, key: Hashable, kind: str = "") -> Any | None:
        raise NotImplementedError

    def take(self, key: Hashable, kind: str = "") -> Any | None:
        raise NotImplementedError

    # -- XEP-0363 HTTP upload -----------------------------------------------------------------------

    def expect_upload(self, put_url: str, info: ExpectedUpload) -> None:
        self.expect(normalize_url(put_url), info, kind=UPLOAD)

    def take_upload(self, put_url: str) -> ExpectedUpload | None:
        """For the HTTP carrier when a PUT arrives: whose upload is this? (None: not announced.)"""
        return self.take(normalize_url(put_url), kind=UPLOAD)

    def mark_blocked_url(self, get_url: str, reason: str) -> None:
        """The file behind this download URL was blocked: messages carrying the URL are blocked too."""
        self.any_blocked_urls = True
        self.expect(normalize_url(get_url), reason or "blocked", kind=BLOCKED_URL,
                    ttl=self.settings.blocked_url_ttl_seconds)

    def blocked_url_reason(self, url: str) -> str | None:
        return self.get(normalize_url(url), kind=BLOCKED_URL)

    def expect_download(self, info: ExpectedDownload, key: str = "") -> None:
        """A link to a file was delivered to our user: a GET of it (within ttl_seconds) is that file, coming in. A
        later share of the same URL replaces the entry (the newest context names the parties). `key`: another URL
        that fetches the same file (the link rewritten to an upload relay); the carrier sends such a GET on to
        `info.url`."""
        self.expect(normalize_url(key or info.url), info, kind=DOWNLOAD)

    def expected_download(self, url: str) -> ExpectedDownload | None:
        """For the HTTP carrier when a GET arrives: the file shared by this link, left in place (a client may fetch
        it again, or from another device)."""
        return self.get(normalize_url(url), kind=DOWNLOAD)

    # -- XEP-0065 SOCKS5 bytestreams --------------------------------------------------------------

    def expect_bytestream(self, dst_hash: str, info: ExpectedBytestream) -> None:
        self.expect(dst_hash.lower(), info, kind=BYTESTREAM)

    def lookup_bytestream(self, dst_hash: str) -> ExpectedBytestream | None:
        """For the SOCKS5 carrier: the offer behind a CONNECT's hash, left in place (with a mediated
        proxy both the initiator and the target connect with the same hash)."""
        return self.get(dst_hash.lower(), kind=BYTESTREAM)


class ExpectedTransfers(_Typed):
    """A bounded, expiring, thread-safe table of announced transfers."""

    def __init__(self, settings: TransferSettings = TransferSettings(),
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, Hashable], tuple[float, Any]] = OrderedDict()
        # A URL was ever marked blocked (mark_blocked_url): until then no message needs its links looked up.
        self.any_blocked_urls = False

    # -- generic ----------------------------------------------------------------------------------

    def expect(self, key: Hashable, value: Any, kind: str = "", ttl: float | None = None) -> None:
        """Remember `value` under (kind, key) for `ttl` seconds (default ttl_seconds). Replaces an older entry."""
        deadline = self._clock() + (self.settings.ttl_seconds if ttl is None else ttl)
        with self._lock:
            self._expire()
            k = (kind, key)
            self._entries.pop(k, None)
            self._entries[k] = (deadline, value)
            while len(self._entries) > max(0, self.settings.max_entries):
                self._entries.popitem(last=False)

    def get(self, key: Hashable, kind: str = "") -> Any | None:
        """The live entry, left in place (several connections may use one announcement)."""
        with self._lock:
            entry = self._entries.get((kind, key))
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._entries[(kind, key)]
                return None
            return entry[1]

    def take(self, key: Hashable, kind: str = "") -> Any | None:
        """The live entry, removed (an announcement used once)."""
        with self._lock:
            entry = self._entries.pop((kind, key), None)
            if entry is None or entry[0] <= self._clock():
                return None
            return entry[1]

    def discard(self, key: Hashable, kind: str = "") -> None:
        with self._lock:
            self._entries.pop((kind, key), None)

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._entries)

    def _expire(self) -> None:
        # Entries are in insertion order, but ttls differ per kind: drop expired entries from the oldest
        # end and stop at the first live one (O(1) amortised); a stale entry behind a live one is dropped
        # when it is looked up, or evicted by max_entries.
        now = self._clock()
        entries = self._entries
        while entries:
            key, (deadline, _) = next(iter(entries.items()))
            if deadline > now:
                break
            del entries[key]


# -- the shared table: several workers (SQLite in the data folder) or several gateways (PostgreSQL) -------------

MEMORY, SQLITE = "memory", "sqlite"
SHARED_FILE = "transfers.sqlite3"


class TransferStoreError(RuntimeError):
    """The shared table could not be read or written. The caller follows the fail mode (`store` situation):
    closed, the side transfer is refused with a notice; never treated as "not announced"."""


class _SafeUnpickler(pickle.Unpickler):
    """Entries are imguard's own frozen dataclasses (offers, contexts) and plain values: nothing else is built
    from a row, so a row written by something else cannot run code in the gateway."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("imguard.") or (module, name) in _PLAIN:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not an imguard type")


_PLAIN = {("copyreg", "_reconstructor"), ("builtins", "object"), ("builtins", "frozenset"), ("builtins", "set"),
          ("datetime", "datetime"), ("datetime", "timezone"), ("datetime", "timedelta")}


def _dump(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _load(data: bytes) -> Any:
    return _SafeUnpickler(io.BytesIO(bytes(data))).load()


class _Backend:
    """One SQL table, (kind, key) -> (deadline, created, value): the same statements for SQLite and PostgreSQL
    (upsert, DELETE ... RETURNING), written with `?` and turned into `%s` for psycopg."""

    mark = "?"
    blob = "BLOB"
    MAX_BACKOFF = 30.0

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conn: Any = None
        self._down_until = 0.0          # after a failure, fail at once for a while instead of waiting again
        self._backoff = 0.0             # that while: 1 s after the first failure, doubling up to MAX_BACKOFF

    def _connect(self) -> Any:
        raise NotImplementedError

    def _errors(self) -> tuple[type[BaseException], ...]:
        raise NotImplementedError

    def _sql(self, statement: str) -> str:
        return statement if self.mark == "?" else statement.replace("?", self.mark)

    def schema(self) -> list[str]:
        return [f"CREATE TABLE IF NOT EXISTS expected_transfers (kind TEXT NOT NULL, key TEXT NOT NULL, "
                f"deadline DOUBLE PRECISION NOT NULL, created DOUBLE PRECISION NOT NULL, value {self.blob} NOT NULL, "
                f"PRIMARY KEY (kind, key))",
                "CREATE INDEX IF NOT EXISTS expected_transfers_deadline ON expected_transfers (deadline)",
                "CREATE INDEX IF NOT EXISTS expected_transfers_created ON expected_transfers (created)"]

    def run(self, statement: str, params: tuple = (), fetch: bool = False) -> list[tuple]:
        with self._lock:
            if self._conn is None:
                if time.monotonic() < self._down_until:
                    raise TransferStoreError("the shared expected-transfers store is unavailable (retrying shortly)")
                try:
                    self._conn = self._connect()
                except Exception as e:
                    self._failed()
                    raise TransferStoreError(f"cannot open the shared expected-transfers store: {e}") from e
            try:
                cursor = self._conn.execute(self._sql(statement), params)
                rows = cursor.fetchall() if fetch else []
            except self._errors() as e:
                self._drop()
                raise TransferStoreError(f"shared expected-transfers store: {e}") from e
            self._backoff = 0.0
            return rows

    def _failed(self) -> None:
        # The caller is the event loop: a store that is down must not make every lookup wait for its timeout.
        self._backoff = min(self.MAX_BACKOFF, self._backoff * 2 or 1.0)
        self._down_until = time.monotonic() + self._backoff

    def _drop(self) -> None:
        try:
            self._conn.close()
        except Exception:
            pass
        self._conn = None
        self._failed()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None


class SqliteBackend(_Backend):
    """A file in the data folder, for the workers of one host (WAL: readers never wait for the writer)."""

    def __init__(self, path: Path, timeout: float = 2.0):
        super().__init__(timeout)
        self.path = Path(path)

    def _connect(self) -> Any:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        for statement in self.schema():
            conn.execute(statement)
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            pass
        return conn

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)


class PostgresBackend(_Backend):
    """The PostgreSQL server the gateways' archive already uses (`archive_dsn`), for several gateway hosts."""

    mark = "%s"
    blob = "BYTEA"

    def __init__(self, dsn: str, timeout: float = 2.0):
        super().__init__(timeout)
        import psycopg  # imported here: only a shared PostgreSQL table needs it
        self._psycopg = psycopg
        self.dsn = dsn

    def _connect(self) -> Any:
        # Bounded waits: connecting, a statement (server side), and a connection that stops answering (TCP).
        conn = self._psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(2, int(self.timeout + 0.999)),
                                     options=f"-c statement_timeout={int(self.timeout * 1000)}",
                                     tcp_user_timeout=int(self.timeout * 1000), keepalives=1, keepalives_idle=5,
                                     keepalives_interval=2, keepalives_count=2)
        for statement in self.schema():
            try:
                conn.execute(statement)
            except self._psycopg.errors.UniqueViolation:
                pass                        # another gateway created it at the same moment
        return conn

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (self._psycopg.Error,)


class SharedTransfers(_Typed):
    """The expected-transfers table in a store several processes share, with ExpectedTransfers' interface.

    Keys are stored as their repr within their kind (tuples of str/int, strings), values pickled (read back only as
    imguard's own types). Deadlines are wall-clock times, since monotonic clocks differ per process and host.
    `get` and `take` are one primary-key statement each; `take` is one DELETE ... RETURNING, so two workers never
    both take one upload slot. Every `MAINTAIN_EVERY` writes (or `MAINTAIN_SECONDS`), expired entries are deleted and
    the oldest beyond max_entries forgotten, so the table stays bounded (within MAINTAIN_EVERY per writer).
    A failure raises TransferStoreError: the caller refuses the side transfer; it is never "not announced".
    """

    MAINTAIN_EVERY = 256
    MAINTAIN_SECONDS = 10.0
    # Any URL may have been blocked by another worker: messages' links are always looked up.
    any_blocked_urls = True

    def __init__(self, backend: _Backend, settings: TransferSettings = TransferSettings(),
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.backend = backend
        self._clock = clock
        self._writes = 0
        self._maintained = 0.0

    @staticmethod
    def _key(key: Hashable) -> str:
        return repr(key)

    def expect(self, key: Hashable, value: Any, kind: str = "", ttl: float | None = None) -> None:
        now = self._clock()
        deadline = now + (self.settings.ttl_seconds if ttl is None else ttl)
        try:
            data = _dump(value)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise TransferStoreError(f"cannot store a {type(value).__name__} in the shared table: {e}") from e
        self.backend.run("INSERT INTO expected_transfers (kind, key, deadline, created, value) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT (kind, key) DO UPDATE SET deadline = excluded.deadline, "
                         "created = excluded.created, value = excluded.value",
                         (kind, self._key(key), deadline, now, data))
        self._writes += 1
        if self._writes >= self.MAINTAIN_EVERY or now - self._maintained >= self.MAINTAIN_SECONDS:
            self.maintain(now)

    def maintain(self, now: float | None = None) -> None:
        """Delete expired entries, then the oldest beyond max_entries."""
        now = self._clock() if now is None else now
        self._writes, self._maintained = 0, now
        self.backend.run("DELETE FROM expected_transfers WHERE deadline <= ?", (now,))
        [(count,)] = self.backend.run("SELECT count(*) FROM expected_transfers", fetch=True)
        excess = count - max(0, self.settings.max_entries)
        if excess > 0:
            self.backend.run("DELETE FROM expected_transfers WHERE (kind, key) IN (SELECT kind, key FROM "
                             "expected_transfers ORDER BY created LIMIT ?)", (excess,))

    def _value(self, rows: list[tuple]) -> Any | None:
        if not rows:
            return None
        deadline, data = rows[0]
        if deadline <= self._clock():
            return None
        try:
            return _load(data)
        except Exception as e:          # a row imguard did not write, or from an incompatible version
            raise TransferStoreError(f"unreadable entry in the shared table: {e}") from e

    def get(self, key: Hashable, kind: str = "") -> Any | None:
        """The live entry, left in place."""
        return self._value(self.backend.run(
            "SELECT deadline, value FROM expected_transfers WHERE kind = ? AND key = ? AND deadline > ?",
            (kind, self._key(key), self._clock()), fetch=True))

    def take(self, key: Hashable, kind: str = "") -> Any | None:
        """The live entry, removed, by exactly one of the processes asking."""
        return self._value(self.backend.run(
            "DELETE FROM expected_transfers WHERE kind = ? AND key = ? RETURNING deadline, value",
            (kind, self._key(key)), fetch=True))

    def discard(self, key: Hashable, kind: str = "") -> None:
        self.backend.run("DELETE FROM expected_transfers WHERE kind = ? AND key = ?", (kind, self._key(key)))

    def entries(self, kind: str, limit: int = 1000) -> list[tuple[Any, Any]]:
        """The live (key, value) pairs of one kind, at most `limit` (for a mailbox kind such as NOTICE, whose
        readers filter by what they hold). A row whose key or value cannot be read is skipped."""
        rows = self.backend.run("SELECT key, value FROM expected_transfers WHERE kind = ? AND deadline > ? "
                                "ORDER BY created LIMIT ?", (kind, self._clock(), limit), fetch=True)
        found = []
        for key, data in rows:
            try:
                found.append((ast.literal_eval(key), _load(data)))
            except Exception:
                continue
        return found

    def __len__(self) -> int:
        [(count,)] = self.backend.run("SELECT count(*) FROM expected_transfers WHERE deadline > ?",
                                      (self._clock(),), fetch=True)
        return int(count)

    def close(self) -> None:
        self.backend.close()


def open_transfers(store: str, data_dir: Path | None, settings: TransferSettings = TransferSettings(),
                   timeout: float = 2.0) -> ExpectedTransfers | SharedTransfers:
    """The table a gateway uses, by the `transfer_store` setting: `memory` (one worker), `sqlite` (the workers of
    one host sharing DATA_DIR/transfers.sqlite3), or a PostgreSQL connection string (several gateway hosts)."""
    store = (store or MEMORY).strip()
    if store == MEMORY:
        return ExpectedTransfers(settings)
    if store == SQLITE:
        if data_dir is None:
            raise ValueError("transfer_store sqlite needs the data folder")
        return SharedTransfers(SqliteBackend(Path(data_dir) / SHARED_FILE, timeout), settings)
    if store.startswith(("postgresql:", "postgres:")) or "dbname=" in store or "host=" in store:
        return SharedTransfers(PostgresBackend(store, timeout), settings)
    raise ValueError(f"transfer_store {store!r}: expected 'memory', 'sqlite' or a PostgreSQL connection string")
