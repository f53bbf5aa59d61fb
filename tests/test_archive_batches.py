"""The archive's queue records: a commit's rows are one queue record (what earlier versions queued is still read), and
the writer looks the uids of a batch up only while they may be stored already (a previous process's backlog, a
write that failed)."""

import json

from imguard import archive
from imguard.model import ALLOW, ChatContext, Decision

CTX = ChatContext(protocol="irc", sender="alice", recipients=("bob",), connection_id="c1")


def row(uid: str, text: str) -> list:
    return [uid, "2026-12-06T10:00:00.000+00:00", "message", "irc", "", "alice", "bob", "", "", "c1", text,
            None, None, None, None, None, ALLOW, "", "v1"]


def test_a_commit_is_one_record_and_every_earlier_shape_is_read():
    """A commit's rows (one of them with a lone surrogate, which orjson refuses), a single row and a JSON object
    (what earlier versions queued), read back in one run: the rows in order, the surrogate made U+FFFD."""
    batch = archive._encode_rows([row("u1", "one"), row("u2", "bad \udcff"), row("u3", "three")])
    single = archive._encode_row(row("u4", "four"))
    obj = json.dumps(dict(zip(archive.ROW_COLUMNS, row("u5", "five"), strict=True))).encode()
    rows = archive._decode_rows([batch, single, obj])
    assert [r[0] for r in rows] == ["u1", "u2", "u3", "u4", "u5"]
    assert [r[10] for r in rows] == ["one", "bad \ufffd", "three", "four", "five"]
    assert rows[0] == row("u1", "one")


class Recording:
    """The SQLite store, with each write's check_stored flag recorded, and a write that can be made to fail."""

    def __init__(self, store):
        self.store, self.calls, self.fail = store, [], 0

    def write_rows(self, rows, check_stored=True):
        self.calls.append((len(rows), check_stored))
        if self.fail:
            self.fail -= 1
            raise OSError("database refused")
        self.store.write_rows(rows, check_stored)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_uids_are_looked_up_only_while_rows_may_be_stored(tmp_path):
    """A restart re-sends a batch (the cursor never moved): looked up, stored once. Then, caught up, the next batches
    are not looked up; after a failed write they are again, until the writer has caught up once more."""
    first = archive.Archive(tmp_path / "a.sqlite3", queue_dir=tmp_path / "queue")
    for n in range(5):
        first.add_message(f"m{n}", CTX, Decision(action=ALLOW))
    first.commit()
    assert first.flush()
    first.close()
    state = tmp_path / "queue" / "state"
    state.write_bytes(b"\x00" * 8 + state.read_bytes()[8:])      # the cursor never moved: all re-sent

    store = archive.Archive(tmp_path / "a.sqlite3", queue_dir=tmp_path / "queue")
    queued = store._backend
    recording = queued.store = Recording(queued.store)
    assert store.flush()
    assert recording.calls == [(5, True)]                       # the backlog: looked up
    store.add_message("m5", CTX, Decision(action=ALLOW))
    store.commit()
    assert store.flush()
    assert recording.calls[-1] == (1, False)                    # queued by this process after catching up
    recording.fail = 1
    store.add_message("m6", CTX, Decision(action=ALLOW))
    store.commit()
    assert store.flush(30)
    assert recording.calls[-2:] == [(1, False), (1, True)]      # failed, then retried with the lookup
    store.add_message("m7", CTX, Decision(action=ALLOW))
    store.commit()
    assert store.flush()
    assert recording.calls[-1] == (1, False)
    assert [r["text"] for r in store.search(archive.Query())] == [f"m{n}" for n in range(8)]
    store.close()
