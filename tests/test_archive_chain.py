"""The archive an auditor can rely on: every record and quarantined file is hash-chained, and `imguard archive
verify` proves the chains unbroken or names the first record altered, deleted or slipped in; legal holds keep
what they cover; retention by group deletes what its rules let go and leaves the chain verifiable."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sqlite3

from imguard import archive, archive_audit as audit, cli
from imguard.model import ALLOW, BLOCK, ChatContext, Decision, FileReport, RuleMatch
from imguard.quarantine import QuarantineStore

ALICE = ChatContext(protocol="xmpp", sender="alice@example.com", recipients=("bob@ext.example",),
                    conversation="alice@example.com/bob@ext.example")


def _gateway_archive(data_dir):
    """Records written the gateway's way: queue, writer thread, chain per queue slot."""
    return archive.open_archive(data_dir)


def _fill(data_dir, n=5):
    store = _gateway_archive(data_dir)
    for i in range(n):
        store.add_message(f"message {i}", ALICE, Decision(action=ALLOW))
    store.commit()
    store.close()


def _verify(data_dir, *extra):
    return cli.main(["archive", "verify", "--data-dir", str(data_dir), *extra])


def _sql(data_dir, sql, args=()):
    db = sqlite3.connect(data_dir / "archive.sqlite3", isolation_level=None)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def _events(data_dir, action):
    path = data_dir / "alerts.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["event"].get("action") == action]


def test_an_untouched_archive_verifies(tmp_path, capsys):
    _fill(tmp_path)
    assert _verify(tmp_path) == 0
    out = capsys.readouterr().out
    assert "5 records, head seq 5" in out and "archive verified" in out
    # The chain is what the module text says, recomputed here from the rows themselves.
    rows = _sql(tmp_path, f"SELECT {', '.join(archive.ROW_COLUMNS)}, chain_id, chain_seq, digest, chain "
                          "FROM records ORDER BY chain_seq")
    previous = "0" * 64
    for row in rows:
        values, (chain_id, seq, digest, chain) = list(row[:-4]), row[-4:]
        assert hashlib.sha256(json.dumps([chain_id, seq, *values], separators=(",", ":"),
                                         ensure_ascii=False).encode()).hexdigest() == digest
        assert hashlib.sha256(bytes.fromhex(previous) + bytes.fromhex(digest)).hexdigest() == chain
        previous = chain
    [event] = _events(tmp_path, "archive_verify")
    assert event["event"]["outcome"] == "success"


def test_an_altered_row_is_named_and_verify_fails(tmp_path, capsys):
    _fill(tmp_path)
    [(record_id,)] = _sql(tmp_path, "SELECT id FROM records WHERE text = 'message 2'")
    _sql(tmp_path, "UPDATE records SET text = 'message two, edited' WHERE id = ?", (record_id,))
    assert _verify(tmp_path) == 1
    out = capsys.readouterr().out
    [tampered] = [line for line in out.splitlines() if line.startswith("TAMPERED")]
    assert "seq 3" in tampered and f"record id {record_id}" in tampered and "altered" in tampered
    [event] = _events(tmp_path, "archive_verify")
    assert event["event"]["outcome"] == "failure" and event["event"]["kind"] == "alert"


def test_an_altered_row_with_a_recomputed_digest_breaks_the_link(tmp_path, capsys):
    """The forger recomputes the row's digest too: the next link no longer matches."""
    _fill(tmp_path)
    [(chain_id, seq, *values)] = _sql(tmp_path, f"SELECT chain_id, chain_seq, {', '.join(archive.ROW_COLUMNS)} "
                                                "FROM records WHERE chain_seq = 4")
    values[archive.ROW_COLUMNS.index("text")] = "forged"
    _sql(tmp_path, "UPDATE records SET text = 'forged', digest = ? WHERE chain_seq = 4",
         (archive.record_digest(chain_id, seq, values),))
    assert _verify(tmp_path) == 1
    assert "seq 4" in capsys.readouterr().out.split("TAMPERED:")[1]


def test_a_deleted_row_is_named(tmp_path, capsys):
    _fill(tmp_path)
    _sql(tmp_path, "DELETE FROM records WHERE chain_seq = 2")
    assert _verify(tmp_path) == 1
    assert "records seq 2..2 are missing" in capsys.readouterr().out


def test_cutting_the_tail_is_caught_with_saved_heads(tmp_path, capsys):
    _fill(tmp_path)
    heads = tmp_path / "heads.json"
    assert _verify(tmp_path, "--save-heads", str(heads)) == 0
    _sql(tmp_path, "DELETE FROM records WHERE chain_seq = 5")
    assert _verify(tmp_path) == 0               # a shorter chain is still a valid chain...
    assert _verify(tmp_path, "--heads", str(heads)) == 1    # ...but not the one seen before
    assert "ends at seq 4, but was saved earlier at seq 5" in capsys.readouterr().out


def test_a_record_slipped_in_outside_the_chain_is_named(tmp_path, capsys):
    _fill(tmp_path)
    _sql(tmp_path, "INSERT INTO records (uid, time, kind, action, text) VALUES ('x', '2020-01-01', 'message', "
                   "'allow', 'never said')")
    assert _verify(tmp_path) == 1
    assert "stored outside the chain after the chain began" in capsys.readouterr().out


def test_an_archive_from_before_the_chain_reports_unchained_records_not_tampering(tmp_path, capsys):
    """An archive made by the previous version (no chain columns) is upgraded in place."""
    db = sqlite3.connect(tmp_path / "archive.sqlite3")
    db.executescript("""CREATE TABLE records (id INTEGER PRIMARY KEY, uid TEXT UNIQUE, time TEXT NOT NULL,
        kind TEXT NOT NULL, protocol TEXT, direction TEXT, sender TEXT, recipients TEXT, conversation TEXT,
        client_address TEXT, connection_id TEXT, text TEXT, file_name TEXT, file_size INTEGER, sha256 TEXT,
        mime TEXT, mechanism TEXT, action TEXT NOT NULL, rules TEXT, policy_version TEXT);
        INSERT INTO records (uid, time, kind, action, text) VALUES ('old1', '2024-01-01T00:00:00.000+00:00',
        'message', 'allow', 'from before'), ('old2', '2024-01-02T00:00:00.000+00:00', 'message', 'allow', 'x');""")
    db.commit()
    db.close()
    _fill(tmp_path, 3)
    assert _verify(tmp_path) == 0
    out = capsys.readouterr().out
    assert "2 records unchained before 20" in out and "3 records, head seq 3" in out
    assert [r["text"] for r in archive.Archive(tmp_path / "archive.sqlite3").search(archive.Query())][:1] == \
        ["from before"]


def test_two_workers_write_two_chains_and_a_restart_continues_its_chain(tmp_path, capsys):
    first, second = _gateway_archive(tmp_path), _gateway_archive(tmp_path)
    for n in range(20):
        (first if n % 2 else second).add_message(f"m{n}", ALICE, Decision(action=ALLOW))
    first.close()
    second.close()
    _fill(tmp_path, 2)              # takes the first free queue slot again: the same chain goes on
    assert _verify(tmp_path) == 0
    out = capsys.readouterr().out
    assert sorted(line.split(":")[1].split(",")[0] for line in out.splitlines() if line.startswith("chain ")) == \
        [" 10 records", " 12 records"]


def test_a_batch_resent_after_a_crash_keeps_the_chain_whole(tmp_path):
    _fill(tmp_path, 10)
    state = tmp_path / "queue" / "archive" / "state"
    state.write_bytes(b"\x00" * 8 + state.read_bytes()[8:])      # the cursor never moved: all re-sent
    _fill(tmp_path, 1)
    result = audit.verify(archive.Archive(tmp_path / "archive.sqlite3"))
    assert result.ok and [c["records"] for c in result.chains.values()] == [11]


def _quarantine_file(data_dir, data=b"MZ blocked bytes", sender="mallory@ext.example"):
    report = FileReport(name="a.exe", path="a.exe", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    ctx = ChatContext(protocol="xmpp", sender=sender, recipients=("alice@example.com",))
    decision = Decision(action=BLOCK, matches=[RuleMatch("block-exe", BLOCK, "high", "enforce")])
    path = QuarantineStore(data_dir / "quarantine").put(data, report, ctx, decision)
    store = _gateway_archive(data_dir)
    store.add_file(report, ctx, decision)
    store.close()
    return path


def test_an_altered_or_missing_quarantined_file_is_named(tmp_path, capsys):
    path = _quarantine_file(tmp_path)
    assert _verify(tmp_path) == 0
    assert "1 files verified" in capsys.readouterr().out
    os.chmod(path, 0o600)
    path.write_bytes(b"something else")
    assert _verify(tmp_path) == 1
    assert f"quarantined file {path.name} (ledger line 1): altered" in capsys.readouterr().out
    path.unlink()
    assert _verify(tmp_path) == 1
    assert f"quarantined file {path.name} (ledger line 1): missing" in capsys.readouterr().out


def test_a_removed_quarantine_ledger_line_is_named(tmp_path, capsys):
    _quarantine_file(tmp_path, b"first")
    _quarantine_file(tmp_path, b"second")
    ledger = tmp_path / "quarantine" / "ledger.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(lines[1])
    assert _verify(tmp_path) == 1
    assert "quarantine ledger line 1 (seq 2): altered, or a line before it was removed" in capsys.readouterr().out


# --- holds and retention --------------------------------------------------------------------------------

def _old_record(store, days_ago, sender, recipients="", conversation="", now=None):
    now = now or datetime.datetime.now(datetime.timezone.utc)
    when = (now - datetime.timedelta(days=days_ago)).isoformat(timespec="milliseconds")
    row = [os.urandom(8).hex(), when, "message", "xmpp", "outbound", sender, recipients, conversation, "", "",
           f"{sender} {days_ago}d", None, None, None, None, None, "allow", "", ""]
    store.database().write_rows([row])


def test_holds_are_added_listed_released_and_each_is_an_event(tmp_path, capsys):
    _fill(tmp_path, 1)
    assert cli.main(["archive", "hold", "add", "person", "ceo@example.com", "--reason", "matter 42",
                     "--data-dir", str(tmp_path)]) == 0
    hold_id = capsys.readouterr().out.strip()
    assert cli.main(["archive", "hold", "list", "--data-dir", str(tmp_path)]) == 0
    [listed] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["id"] == hold_id and listed["value"] == "ceo@example.com" and listed["reason"] == "matter 42"
    assert cli.main(["archive", "hold", "release", hold_id, "--data-dir", str(tmp_path)]) == 0
    assert cli.main(["archive", "hold", "release", hold_id, "--data-dir", str(tmp_path)]) == 2
    assert cli.main(["archive", "hold", "list", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"released {hold_id}")
    assert cli.main(["archive", "hold", "add", "person", " ", "--data-dir", str(tmp_path)]) == 2
    [added] = _events(tmp_path, "archive_hold_add")
    [released] = _events(tmp_path, "archive_hold_release")
    assert added["imguard"]["archive"]["hold"]["id"] == released["imguard"]["archive"]["hold"]["id"] == hold_id
    assert released["imguard"]["archive"]["hold"]["released_at"]


def test_retention_by_group_spares_held_and_minimum_kept_records_and_the_chain_still_verifies(tmp_path, capsys):
    """Executives (rules/groups.yaml) are kept at least 400 days; everyone else at most 30; a hold on a person
    keeps theirs. What goes leaves its link, so the chain verifies after."""
    store = archive.Archive(tmp_path / "archive.sqlite3")
    _old_record(store, 100, "carol@example.com", "dave@ext.example")           # deleted
    _old_record(store, 100, "ceo@example.com", "dave@ext.example")             # executives: min 400 days
    _old_record(store, 100, "erin@example.com", "held@ext.example")            # held
    _old_record(store, 5, "carol@example.com", "dave@ext.example")             # young enough
    _old_record(store, 100, "frank@example.com", "", "#ops")                   # held (conversation)
    store.close()
    assert cli.main(["archive", "hold", "add", "person", "held@ext.example", "--data-dir", str(tmp_path)]) == 0
    assert cli.main(["archive", "hold", "add", "conversation", "#ops", "--data-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert cli.main(["archive", "retention", "apply", "--rule", "*:max=30", "--rule", "executives:min=400",
                     "--data-dir", str(tmp_path)]) == 0
    left = sorted(r["text"] for r in archive.Archive(tmp_path / "archive.sqlite3").search(archive.Query()))
    assert left == ["carol@example.com 5d", "ceo@example.com 100d", "erin@example.com 100d",
                    "frank@example.com 100d"]
    [event] = _events(tmp_path, "archive_retention")
    assert event["imguard"]["archive"]["retention"] == {"deleted": 1, "held": 2, "kept_by_min": 1,
                                                        "files_deleted": 0, "files_held": 0}
    assert _verify(tmp_path) == 0
    assert "1 records removed by retention" in capsys.readouterr().out
    # The deleted record's place can be neither reused nor faked: removing its link is caught.
    _sql(tmp_path, "DELETE FROM removed_records")
    assert _verify(tmp_path) == 1


def test_a_hold_keeps_a_quarantined_file_past_the_quarantine_age_limit(tmp_path):
    held_path = _quarantine_file(tmp_path, b"evidence", sender="mallory@ext.example")
    gone_path = _quarantine_file(tmp_path, b"junk", sender="spammer@ext.example")
    store = archive.Archive(tmp_path / "archive.sqlite3")
    audit.add_hold(store, "person", "mallory@ext.example")
    quarantine = QuarantineStore(tmp_path / "quarantine")
    later = datetime.datetime.now().timestamp() + 200 * 86400      # past the 90-day default
    result = audit.apply_retention(store, [], audit.Parties(), later, quarantine)
    assert held_path.exists() and not gone_path.exists()
    assert (result.files_deleted, result.files_held) == (1, 1)
    problems, counts = quarantine.verify()
    assert problems == [] and counts == {"files verified": 1, "files removed by retention": 1}


def test_the_gateway_housekeeping_applies_group_retention_spares_holds_and_reports(tmp_path):
    """What `imguard run` does hourly: the archive_retention setting, the policy's groups, an event."""
    import pytest

    from imguard.runtime import build_pipeline
    with pytest.raises(ValueError, match="archive_retention"):
        archive.ArchiveSettings(archive_retention=["executives:forever"])
    pipeline = build_pipeline(data_dir=tmp_path, archive_settings=archive.ArchiveSettings(
        archive_retention=["*:max=30", "executives:min=3650"]))
    _old_record(pipeline.archive, 40, "carol@example.com", "dave@ext.example")
    _old_record(pipeline.archive, 40, "cfo@example.com", "dave@ext.example")
    _old_record(pipeline.archive, 40, "erin@example.com", "held@ext.example")
    audit.add_hold(pipeline.archive, "person", "held@ext.example")
    result = audit.housekeeping(pipeline)
    assert (result.deleted, result.kept_by_min, result.held) == (1, 1, 1)
    pipeline.close()
    [event] = _events(tmp_path, "archive_retention")
    assert event["imguard"]["archive"]["rules"] == ["*:max=30", "executives:min=3650"]
    assert audit.verify(archive.Archive(tmp_path / "archive.sqlite3")).ok


def test_a_hold_on_a_group_covers_its_members_as_the_policy_defines_them():
    """rules/groups.yaml: executives are ceo@ and cfo@example.com; security-team includes *@soc.example.com."""
    from imguard.runtime import BUNDLED_RULES
    parties = audit.Parties.from_rules([BUNDLED_RULES])
    holds = [audit.Hold("h1", "group", "security-team")]
    assert audit.held(holds, parties, "ann@soc.example.com", "", "")
    assert audit.held(holds, parties, "x@ext.example", "soc@example.com", "")
    assert not audit.held(holds, parties, "ceo@example.com", "bob@ext.example", "")
    executives = [audit.Hold("h2", "group", "executives")]
    assert audit.held(executives, parties, "bob@ext.example", "CEO@example.com/phone", "")


def test_a_minimum_retention_keeps_a_quarantined_file_past_the_quarantine_age_limit(tmp_path):
    """executives:min=3650 (rules/groups.yaml): a file sent to the CFO outlives the quarantine's 90 days; the
    same file's age limit still applies to everyone else's."""
    from imguard.runtime import BUNDLED_RULES
    kept = _quarantine_file(tmp_path, b"to the cfo", sender="cfo@example.com")
    gone = _quarantine_file(tmp_path, b"to nobody", sender="someone@ext.example")
    store = archive.Archive(tmp_path / "archive.sqlite3")
    later = datetime.datetime.now().timestamp() + 200 * 86400
    result = audit.apply_retention(store, [audit.RetentionRule.parse("executives:min=3650")],
                                   audit.Parties.from_rules([BUNDLED_RULES]), later,
                                   QuarantineStore(tmp_path / "quarantine"))
    assert kept.exists() and not gone.exists() and (result.files_deleted, result.files_held) == (1, 1)
    assert result.deleted == 0          # no max rule: no archive record is due
