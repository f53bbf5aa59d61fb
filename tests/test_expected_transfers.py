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
