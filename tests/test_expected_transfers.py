"""ExpectedTransfers: the bounded, expiring table joining a control channel's announcement to its data."""

import threading

from imguard.files.expected import (ExpectedBytestream, ExpectedDownload, ExpectedTransfers, ExpectedUpload,
                                    StreamHost, TransferSettings, normalize_url)
from imguard.model import FROM_SERVER, ChatContext

ALICE = ChatContext(protocol="xmpp", sender="alice@localhost")
PUT = "http://127.0.0.1:15280/file_share/XBkHXnfjh0EOWcdF7NVRCnkU/eicar.com"   # from xmpp_plain_httpupload.pcap


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def upload(url=PUT):
    return ExpectedUpload(put_url=url, get_url=url, name="eicar.com", size=68,
                          content_type="application/x-msdos-program", context=ALICE)


def test_an_announced_upload_is_taken_once():
    """The HTTP side finds who announced a PUT, and a second PUT to the same URL is not announced."""
    table = ExpectedTransfers()
    table.expect_upload(PUT, upload())
    assert table.take_upload(PUT).context.sender == "alice@localhost"
    assert table.take_upload(PUT) is None


def test_entries_expire_after_ttl():
    """An announcement older than ttl_seconds is gone (edge: alive just before, gone at the deadline)."""
    clock = Clock()
    table = ExpectedTransfers(TransferSettings(ttl_seconds=60), clock=clock)
    table.expect(("10.0.0.5", 5000), "dcc offer")
    clock.now += 59.9
    assert table.get(("10.0.0.5", 5000)) == "dcc offer"
    clock.now += 0.1
    assert table.get(("10.0.0.5", 5000)) is None
    assert len(table) == 0


def test_table_is_bounded_oldest_forgotten_first():
    """max_entries bounds the table: the oldest announcement is evicted (edge: exactly max_entries fit)."""
    table = ExpectedTransfers(TransferSettings(max_entries=3))
    for port in range(3):
        table.expect(("h", port), port)
    assert len(table) == 3 and table.get(("h", 0)) == 0
    table.expect(("h", 3), 3)
    assert len(table) == 3
    assert table.get(("h", 0)) is None and table.get(("h", 3)) == 3


def test_kinds_do_not_collide():
    """The same key under two kinds is two entries (an upload URL is not a blocked URL)."""
    table = ExpectedTransfers()
    table.expect_upload(PUT, upload())
    assert table.blocked_url_reason(PUT) is None
    table.mark_blocked_url(PUT, "EICAR test file")
    assert table.blocked_url_reason(PUT) == "EICAR test file"
    assert table.take_upload(PUT) is not None


def test_blocked_url_matches_without_fragment_and_as_aesgcm():
    """XEP-0454 shares aesgcm://host/path#ivkey for an https PUT: it still matches the blocked URL."""
    table = ExpectedTransfers()
    table.mark_blocked_url("https://Upload.Example.org/f/abc/x.exe", "malware")
    assert table.blocked_url_reason("aesgcm://upload.example.org/f/abc/x.exe#00112233") == "malware"
    assert table.blocked_url_reason("https://upload.example.org/f/abc/y.exe") is None
    assert normalize_url("HTTP://a.b/c#d") == "http://a.b/c"


def test_blocked_urls_outlive_upload_slots():
    """blocked_url_ttl_seconds is longer than ttl_seconds: a link pasted the next day is still blocked."""
    clock = Clock()
    table = ExpectedTransfers(TransferSettings(ttl_seconds=60, blocked_url_ttl_seconds=86400), clock=clock)
    table.mark_blocked_url(PUT, "malware")
    clock.now += 3600
    assert table.blocked_url_reason(PUT) == "malware"
    clock.now += 86400
    assert table.blocked_url_reason(PUT) is None


def shared(url="https://upload.example.org/f/Abc/gift.exe"):
    carol = ChatContext(protocol="xmpp", sender="carol@example.org", recipients=("alice@localhost",),
                        origin=FROM_SERVER, connection_id="c1", transfer_mechanism="xep-0363-get")
    return ExpectedDownload(url=url, name="gift.exe", size=None, content_type="", context=carol)


def test_a_shared_link_is_an_expected_download_until_its_ttl():
    """A link delivered to our user: every GET of it within ttl_seconds finds the file's context (left in place:
    a client fetches again, or from another device), compared as URLs are (no fragment, aesgcm as https, any case
    of host); gone at the deadline."""
    clock = Clock()
    table = ExpectedTransfers(TransferSettings(ttl_seconds=60), clock=clock)
    info = shared()
    table.expect_download(info)
    assert table.expected_download("https://UPLOAD.example.org/f/Abc/gift.exe") is info
    assert table.expected_download("aesgcm://upload.example.org/f/Abc/gift.exe#0011") is info
    assert table.expected_download("https://upload.example.org/f/abc/gift.exe") is None      # the path's case counts
    clock.now += 59.9
    assert table.expected_download(info.url).context.sender == "carol@example.org"
    clock.now += 0.1
    assert table.expected_download(info.url) is None


def test_a_shared_link_is_neither_an_upload_nor_blocked():
    """The download kind is its own: expecting a download announces no PUT and blocks nothing, and a blocked URL
    is not an expected download."""
    table = ExpectedTransfers()
    table.expect_download(shared(PUT))
    assert table.take_upload(PUT) is None and table.blocked_url_reason(PUT) is None and not table.any_blocked_urls
    other = "http://127.0.0.1:15280/file_share/other/x.bin"
    table.mark_blocked_url(other, "malware")
    assert table.expected_download(other) is None and table.expected_download(PUT) is not None


def test_bytestream_lookup_leaves_the_entry_for_the_second_leg():
    """With a mediated proxy both parties connect with the same hash: lookup does not consume it."""
    table = ExpectedTransfers()
    info = ExpectedBytestream(dst_hash="E34BA3FD2764DD641680A28ECF2E67479BA888FC", sid="s", initiator="a@x/a",
                              target="b@x/b", streamhosts=(StreamHost("proxy.x", "127.0.0.1", 15000),),
                              context=ALICE)
    table.expect_bytestream(info.dst_hash, info)
    hashed = "e34ba3fd2764dd641680a28ecf2e67479ba888fc"
    assert table.lookup_bytestream(hashed) is info
    assert table.lookup_bytestream(hashed) is info
    assert (info.host, info.port) == ("127.0.0.1", 15000)


def test_threads_share_the_table():
    """Writers and readers on several threads neither crash nor exceed max_entries."""
    table = ExpectedTransfers(TransferSettings(max_entries=500))

    def work(n):
        for i in range(2000):
            table.expect((n, i), i)
            table.get((n, i - 1))
            table.take((n, i - 2))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(table) <= 500


# -- the shared table: several workers (SQLite in the data folder), several gateways (PostgreSQL) ---------------

import os                                                                             # noqa: E402
import pickle                                                                         # noqa: E402

import pytest                                                                         # noqa: E402

from imguard.files.expected import (PostgresBackend, SharedTransfers, SqliteBackend, TransferStoreError,  # noqa: E402
                                    open_transfers)


@pytest.fixture(scope="module")
def postgres():
    from tests.peers.sink_peers import PostgresServer, postgres_bin
    if postgres_bin() is None and not os.environ.get("CI"):
        pytest.skip("PostgreSQL is not installed (tools/setup.sh test)")
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def two_workers(request, tmp_path):
    """Two tables on one store, as two worker processes (or two gateway hosts) hold them: (make, first, second)."""
    if request.param == "sqlite":
        def make(clock=None, **kw):
            table = SharedTransfers(SqliteBackend(tmp_path / "transfers.sqlite3"), TransferSettings(**kw))
            if clock:
                table._clock = clock
            return table
    else:
        server = request.getfixturevalue("postgres")
        import psycopg
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS expected_transfers")

        def make(clock=None, **kw):
            table = SharedTransfers(PostgresBackend(server.dsn), TransferSettings(**kw))
            if clock:
                table._clock = clock
            return table
    return make


def test_shared_an_upload_announced_on_one_worker_is_taken_once_on_the_other(two_workers):
    """The worker that saw the slot is not the one the PUT lands on: the other finds it, once, with its context."""
    first, second = two_workers(), two_workers()
    first.expect_upload(PUT, upload())
    found = second.take_upload(PUT.replace("127.0.0.1", "127.0.0.1"))
    assert found == upload() and found.context.sender == "alice@localhost"
    assert second.take_upload(PUT) is None and first.take_upload(PUT) is None


def test_shared_blocked_url_and_bytestream_and_dcc_cross(two_workers):
    """Every kind a side connection needs crosses: a blocked URL (as aesgcm), a bytestream hash (left in place), a
    DCC offer keyed by (host, port); kinds do not collide."""
    from imguard.protocols.irc.dcc import DCC_KIND
    first, second = two_workers(), two_workers()
    assert second.any_blocked_urls                       # another worker may block at any time: always look up
    first.mark_blocked_url("https://Upload.Example.org/f/abc/x.exe", "malware")
    assert second.blocked_url_reason("aesgcm://upload.example.org/f/abc/x.exe#0011") == "malware"
    assert second.take_upload("https://upload.example.org/f/abc/x.exe") is None
    info = ExpectedBytestream(dst_hash="E34BA3FD2764DD641680A28ECF2E67479BA888FC", sid="s", initiator="a@x/a",
                              target="b@x/b", streamhosts=(StreamHost("proxy.x", "127.0.0.1", 15000),), context=ALICE)
    first.expect_bytestream(info.dst_hash, info)
    assert second.lookup_bytestream(info.dst_hash.lower()) == info == first.lookup_bytestream(info.dst_hash)
    first.expect(("192.0.2.1", 20001), "offer", kind=DCC_KIND)
    assert second.get(("192.0.2.1", 20001), kind=DCC_KIND) == "offer"
    assert second.get(("192.0.2.1", 20001)) is None and second.get(("192.0.2.1", "20001"), kind=DCC_KIND) is None
    second.discard(("192.0.2.1", 20001), kind=DCC_KIND)
    assert first.get(("192.0.2.1", 20001), kind=DCC_KIND) is None


def test_shared_entries_expire_and_the_table_is_bounded(two_workers):
    """Deadlines are the wall clock both workers read (edge: alive just before, gone at it); maintain() forgets
    expired entries and the oldest beyond max_entries (edge: exactly max_entries stay)."""
    clock = Clock()
    first, second = two_workers(clock, ttl_seconds=60, max_entries=3), two_workers(clock, ttl_seconds=60,
                                                                                    max_entries=3)
    first.expect(("h", 0), 0)
    clock.now += 59.9
    assert second.get(("h", 0)) == 0
    clock.now += 0.1
    assert second.get(("h", 0)) is None and second.take(("h", 0)) is None and len(second) == 0
    for port in range(1, 5):
        clock.now += 1
        first.expect(("h", port), port)
    first.maintain()
    assert len(second) == 3 and second.get(("h", 1)) is None and second.get(("h", 4)) == 4


def test_shared_take_is_won_by_exactly_one_worker(two_workers):
    """Eight workers race for each of 50 slots: every slot is taken exactly once."""
    tables = [two_workers() for _ in range(8)]
    for i in range(50):
        tables[0].expect(("slot", i), i)
    won: list[int] = []

    def race(table):
        for i in range(50):
            if table.take(("slot", i)) is not None:
                won.append(i)

    threads = [threading.Thread(target=race, args=(t,)) for t in tables]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == list(range(50))


def test_shared_a_row_imguard_did_not_write_is_refused(two_workers):
    """A value is read back only as imguard's own types: a pickle that would call os.system is an error."""
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    first = two_workers()
    first.backend.run("INSERT INTO expected_transfers (kind, key, deadline, created, value) VALUES (?, ?, ?, ?, ?)",
                      ("upload", repr(normalize_url(PUT)), 4e9, 0.0, pickle.dumps(Evil())))
    with pytest.raises(TransferStoreError):
        first.take_upload(PUT)


def test_a_store_that_is_down_raises_it_never_answers_not_announced(tmp_path):
    """A failed read is TransferStoreError, not None (None would pass an announced upload unscanned)."""
    missing = SharedTransfers(SqliteBackend(tmp_path / "no" / "such" / "transfers.sqlite3"))
    with pytest.raises(TransferStoreError):
        missing.take_upload(PUT)
    with pytest.raises(TransferStoreError):
        missing.expect_upload(PUT, upload())
    down = SharedTransfers(PostgresBackend("host=/nonexistent port=1 dbname=imguard user=imguard", timeout=1))
    with pytest.raises(TransferStoreError):
        down.blocked_url_reason(PUT)


def test_open_transfers_by_setting(tmp_path):
    """transfer_store: memory (the default), sqlite (in the data folder), a PostgreSQL DSN; anything else is an
    error naming the setting."""
    assert type(open_transfers("memory", tmp_path)) is ExpectedTransfers
    assert type(open_transfers("", None)) is ExpectedTransfers
    shared = open_transfers("sqlite", tmp_path)
    shared.expect(("k",), 1)
    assert (tmp_path / "transfers.sqlite3").stat().st_mode & 0o077 == 0
    assert isinstance(open_transfers("postgresql://imguard@db/imguard", None).backend, PostgresBackend)
    with pytest.raises(ValueError, match="transfer_store"):
        open_transfers("redis://x", tmp_path)


def test_a_store_that_is_down_is_not_waited_for_on_every_lookup(tmp_path):
    """After a failure the store is not tried again for a while (1 s, doubling up to MAX_BACKOFF): lookups fail at
    once instead of each waiting for the connection timeout on the event loop."""
    backend = SqliteBackend(tmp_path / "no" / "such" / "transfers.sqlite3")
    table = SharedTransfers(backend)
    attempts = []
    real_connect = backend._connect
    backend._connect = lambda: attempts.append(1) or real_connect()
    for _ in range(3):
        with pytest.raises(TransferStoreError):
            table.get(("h", 1))
    assert len(attempts) == 1 and backend._backoff == 1.0
    backend._down_until = 0.0
    with pytest.raises(TransferStoreError):
        table.get(("h", 1))
    assert len(attempts) == 2 and backend._backoff == 2.0
    (tmp_path / "no" / "such").mkdir(parents=True)
    backend._down_until = 0.0
    assert table.get(("h", 1)) is None and backend._backoff == 0.0      # back: the next failure starts at 1 s
