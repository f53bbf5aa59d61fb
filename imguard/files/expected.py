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
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable
from urllib.parse import urlsplit, urlunsplit

from imguard.model import ChatContext
from imguard.settings import setting

UPLOAD = "upload"
BLOCKED_URL = "blocked_url"
BYTESTREAM = "bytestream"
DOWNLOAD = "download"


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


class ExpectedTransfers:
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

    def expect_download(self, info: ExpectedDownload) -> None:
        """A link to a file was delivered to our user: a GET of it (within ttl_seconds) is that file, coming in. A
        later share of the same URL replaces the entry (the newest context names the parties)."""
        self.expect(normalize_url(info.url), info, kind=DOWNLOAD)

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
