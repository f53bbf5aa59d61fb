"""Exports for e-discovery: EML (one message per conversation-day) and RSMF 2.0.0 validated against Relativity's
published schema, with the quarantined files attached; incremental with a cursor; each export an event."""

from __future__ import annotations

import datetime
import email
import email.policy
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import pytest

from imguard import archive, cli
from imguard.model import BLOCK, ChatContext, Decision, FileReport, RuleMatch
from imguard.quarantine import QuarantineStore

# Relativity's RSMF 2.0.0 manifest schema (github.com/relativitydev/rsmf-validator-samples, BSD-2-Clause): source and
# licence in tests/data/rsmf/README.md.
RSMF_SCHEMA = Path(__file__).resolve().parent / "data" / "rsmf" / "rsmf_schema_2_0_0.json"
EVIL = b"MZ evil payload"


def _row(uid, when, sender, recipients, text, conversation="", kind="message", **file):
    return [uid, when, kind, "xmpp", "outbound", sender, recipients, conversation, "", "", text,
            file.get("name"), file.get("size"), file.get("sha256"), None, None, file.get("action", "allow"),
            file.get("rules", ""), ""]


def _fill(data_dir):
    """Two days of alice and bob, one day of a room, and a blocked file kept in the quarantine."""
    store = archive.Archive(data_dir / "archive.sqlite3")
    day1, day2 = "2026-03-01T09:00:00.000+00:00", "2026-03-02T10:30:00.000+00:00"
    sha = hashlib.sha256(EVIL).hexdigest()
    QuarantineStore(data_dir / "quarantine").put(
        EVIL, FileReport(name="invoice.exe", path="invoice.exe", size=len(EVIL), sha256=sha),
        ChatContext(protocol="xmpp", sender="mallory@ext.example", recipients=("alice@example.com",)),
        Decision(action=BLOCK, matches=[RuleMatch("block-exe", BLOCK, "high", "enforce")]))
    store.database().write_rows([
        _row("1", day1, "alice@example.com", "bob@ext.example", "hello bob"),
        _row("2", day1.replace("09:00", "09:01"), "bob@ext.example", "alice@example.com", "hi alice, ünïcode"),
        _row("3", day2, "alice@example.com", "bob@ext.example", "next day"),
        _row("4", day1, "carol@example.com", "#ops", "deploying", conversation="#ops"),
        _row("5", day1.replace("09:00", "11:00"), "mallory@ext.example", "alice@example.com", None, kind="file",
             name="invoice.exe", size=len(EVIL), sha256=sha, action="block", rules="block-exe"),
    ])
    store.close()
    return store


def _export(data_dir, fmt, out, *extra):
    return cli.main(["archive", "export", "--format", fmt, "--out", str(out), "--data-dir", str(data_dir), *extra])


def _events(data_dir):
    return [e for e in map(json.loads, (data_dir / "alerts.jsonl").read_text().splitlines())
            if e["event"]["action"] == "archive_export"]


def test_eml_is_one_message_per_conversation_day_with_the_quarantined_file_attached(tmp_path):
    _fill(tmp_path)
    assert _export(tmp_path, "eml", tmp_path / "out") == 0
    docs = {p.name: email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
            for p in sorted((tmp_path / "out").glob("*.eml"))}
    # alice & bob on 03-01 (with mallory's file: alice and mallory are another conversation), on 03-02; #ops.
    subjects = sorted(m["Subject"] for m in docs.values())
    assert subjects == ["xmpp conversation #ops on 2026-03-01",
                        "xmpp conversation alice@example.com & bob@ext.example on 2026-03-01",
                        "xmpp conversation alice@example.com & bob@ext.example on 2026-03-02",
                        "xmpp conversation alice@example.com & mallory@ext.example on 2026-03-01"]
    [day1] = [m for m in docs.values() if m["Subject"].endswith("bob@ext.example on 2026-03-01")]
    body = day1.get_body(("plain",)).get_content()
    assert body.splitlines() == ["09:00:00 alice@example.com: hello bob", "09:01:00 bob@ext.example: hi alice, ünïcode"]
    assert day1["From"].addresses[0].addr_spec == "alice@example.com"
    [with_file] = [m for m in docs.values() if "mallory" in m["Subject"]]
    [attachment] = list(with_file.iter_attachments())
    assert attachment.get_content() == EVIL and attachment.get_filename() == "invoice.exe"
    assert "[block: block-exe]" in with_file.get_body(("plain",)).get_content()
    [event] = _events(tmp_path)
    assert event["imguard"]["archive"]["export"]["documents"] == 4
    assert event["imguard"]["archive"]["export"]["attached"] == 1


def _rsmf_zip(path: Path) -> zipfile.ZipFile:
    message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert message["X-RSMF-Version"] == "2.0.0"
    [zipped] = [a for a in message.iter_attachments() if a.get_filename() == "rsmf.zip"]
    return zipfile.ZipFile(io.BytesIO(zipped.get_content()))


def test_rsmf_manifests_validate_against_the_published_schema_and_carry_their_files(tmp_path):
    if not RSMF_SCHEMA.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"the RSMF schema is missing: {RSMF_SCHEMA}")
        pytest.skip(f"the RSMF schema is missing: {RSMF_SCHEMA}")
    import jsonschema
    schema = json.loads(RSMF_SCHEMA.read_text())
    checker = jsonschema.FormatChecker()
    checker.checks("date-time", raises=ValueError)(lambda value: bool(datetime.datetime.fromisoformat(value)))
    validator = jsonschema.Draft7Validator(schema, format_checker=checker)
    _fill(tmp_path)
    assert _export(tmp_path, "rsmf", tmp_path / "out") == 0
    documents = sorted((tmp_path / "out").glob("*.rsmf"))
    assert len(documents) == 4
    events = 0
    for path in documents:
        zipped = _rsmf_zip(path)
        manifest = json.loads(zipped.read("rsmf_manifest.json"))
        assert list(validator.iter_errors(manifest)) == []
        # What the schema cannot say: every reference resolves, every attachment is in the zip.
        ids = {p["id"] for p in manifest["participants"]}
        assert set(manifest["conversations"][0]["participants"]) <= ids
        for event in manifest["events"]:
            assert event.get("participant", "P1") in ids and event["conversation"] == "C1"
            for attachment in event.get("attachments", ()):
                assert zipped.read(attachment["id"]) == EVIL and attachment["size"] == len(EVIL)
        events += len(manifest["events"])
    assert events == 5
    # The schema is not a formality: a manifest missing its events is refused.
    assert list(validator.iter_errors({"version": "2.0.0", "participants": [], "conversations": []}))
    [room] = [p for p in documents if "_ops_" in p.name]
    assert json.loads(_rsmf_zip(room).read("rsmf_manifest.json"))["conversations"][0]["type"] == "channel"


def test_an_incremental_export_takes_only_what_was_stored_since(tmp_path):
    _fill(tmp_path)
    cursor = tmp_path / "cursor.json"
    assert _export(tmp_path, "eml", tmp_path / "first", "--cursor", str(cursor)) == 0
    assert len(list((tmp_path / "first").glob("*.eml"))) == 4
    assert _export(tmp_path, "eml", tmp_path / "empty", "--cursor", str(cursor)) == 0
    assert list((tmp_path / "empty").glob("*.eml")) == []
    store = archive.Archive(tmp_path / "archive.sqlite3")
    store.database().write_rows([_row("6", "2026-03-02T18:00:00.000+00:00", "bob@ext.example",
                                      "alice@example.com", "late reply")])
    store.close()
    assert _export(tmp_path, "eml", tmp_path / "second", "--cursor", str(cursor)) == 0
    [doc] = [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
             for p in (tmp_path / "second").glob("*.eml")]
    assert doc.get_body(("plain",)).get_content().splitlines() == ["18:00:00 bob@ext.example: late reply"]
    assert [e["imguard"]["archive"]["export"]["messages"] for e in _events(tmp_path)] == [4, 0, 1]
    # A search narrows an export: one person, one conversation.
    assert _export(tmp_path, "eml", tmp_path / "ops", "--conversation", "#ops") == 0
    assert len(list((tmp_path / "ops").glob("*.eml"))) == 1
