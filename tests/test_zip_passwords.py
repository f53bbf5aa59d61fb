"""Encrypted zips opened with the passwords of the conversation (imguard/inspect/passwords.py) and of the
zip_passwords setting, through libarchive (ZipCrypto and WinZip AES), in the inspector and the pipeline.

The encrypted archives are made by 7-Zip (`7zz`, Debian's 7zip, in tools/setup.sh), not by imguard; the message
that held a password is checked against the archive's own record of it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from imguard import runtime
from imguard.inspect import InspectLimits, Inspector, load_signatures
from imguard.inspect.archives import Budget, Container, open_encrypted_zip, walk_zip
from imguard.inspect.passwords import AFTER, BEFORE, Candidate, ConversationPasswords, locked_members, words_of
from imguard.model import ENCRYPTED, UNSCANNABLE, YARA_MATCH, ChatContext
from tests.test_e2e_irc import Chat, Route, irc_dir, irc_gateway, ircd, sha256  # noqa: F401  (its fixtures too)

ROOT = Path(__file__).resolve().parents[1]
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-" + b"ANTIVIRUS-TEST-FILE!$H+H*"
ALICE_TO_BOB = ChatContext(protocol="irc", direction="outbound", sender="alice!a@10.0.0.1", recipients=("bob",))
BOB_TO_ALICE = ChatContext(protocol="irc", direction="inbound", sender="bob!b@192.0.2.7", recipients=("alice",))
PASSWORD = "Tr0ub4dor&3-7f1e"


def seven_zip() -> str:
    found = shutil.which("7zz") or shutil.which("7z")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("7zz (Debian package 7zip) is not installed: tools/setup.sh installs it")
        pytest.skip("7zz (Debian package 7zip) is not installed")
    return found


def encrypted_zip(tmp_path: Path, members: dict[str, bytes], password: str, method: str = "ZipCrypto",
                  fmt: str = "zip", stored: bool = False) -> bytes:
    """An archive made by 7-Zip: zip with ZipCrypto or AES256, or 7z (always AES); `stored`: not compressed."""
    folder = tmp_path / f"src-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    for name, content in members.items():
        (folder / name).write_bytes(content)
    out = folder.with_suffix(f".{fmt}")
    options = ([f"-mem={method}"] if fmt == "zip" else []) + (["-mx=0"] if stored else [])
    subprocess.run([seven_zip(), "a", f"-t{fmt}", *options, f"-p{password}", str(out), *members], cwd=folder,
                   check=True, capture_output=True)
    return out.read_bytes()


@pytest.fixture(scope="module")
def signatures(tmp_path_factory):
    return load_signatures(ROOT / "signatures", tmp_path_factory.mktemp("zp"))


@pytest.fixture
def pipeline(tmp_path):
    made = runtime.build_pipeline(ROOT / "rules", ROOT / "signatures", tmp_path / "data")
    yield made
    made.close()


def findings(report, kind):
    return [(r.path, f) for r in report.walk() for f in r.findings if f.kind == kind]


def file_events(data_dir: Path) -> list[dict]:
    lines = (data_dir / "alerts.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event", {}).get("dataset") == "imguard.file"]


@pytest.mark.parametrize("method", ["ZipCrypto", "AES256"])
def test_the_configured_list_opens_infected_zips(tmp_path, signatures, method):
    """`infected` (the default zip_passwords) opens a sample zip the way researchers exchange them; what was inside
    is scanned, and the finding names the list entry, not the password."""
    data = encrypted_zip(tmp_path, {"sample.com": EICAR}, "infected", method)
    report = Inspector(signatures).inspect(data, ALICE_TO_BOB, name="sample.zip")
    assert [(p, f.data["rule"]) for p, f in findings(report, YARA_MATCH)] == [("sample.zip!sample.com",
                                                                                "EICAR_Test_File")]
    assert [f.data for _, f in findings(report, ENCRYPTED)] == [{"password_source": "list", "list_entry": 1}]
    assert not findings(report, UNSCANNABLE) and locked_members(report) == 0


def test_no_password_keeps_it_unscannable_and_the_bundled_policy_blocks(tmp_path, signatures):
    """Without the right password the members stay unscannable (zip here; 7z and RAR: test_encrypted_7z_rar.py)."""
    policy = runtime.load_configuration([ROOT / "rules"], ROOT / "signatures", None).policy
    inspector = Inspector(signatures)
    for data, name in ((encrypted_zip(tmp_path, {"a.txt": b"quarterly numbers"}, PASSWORD), "a.zip"),
                       (encrypted_zip(tmp_path, {"a.txt": b"quarterly numbers"}, PASSWORD, fmt="7z"), "a.7z")):
        report = inspector.inspect(data, ALICE_TO_BOB, name=name)
        assert [f.data["reason"] for _, f in findings(report, UNSCANNABLE)] == ["encrypted"], name
        decision = policy.decide_file(report, ALICE_TO_BOB)
        assert decision.action == "block" and "unscannable-file" in decision.rule_ids


def test_a_wrong_zipcrypto_password_that_passes_the_check_byte_is_refused(tmp_path, signatures):
    """libarchive takes one wrong ZipCrypto password in 256 (its check byte) and returns garbage: the member's size
    and CRC-32 tell it apart, so the member stays locked rather than being scanned as that garbage."""
    import libarchive
    from libarchive.exception import ArchiveError

    # Stored, not deflated: garbage from a wrong key would otherwise fail to inflate, and libarchive would say so.
    data = encrypted_zip(tmp_path, {"a.txt": b"quarterly numbers, nothing secret\n" * 50}, PASSWORD, stored=True)
    accepted = None
    for i in range(5000):
        try:
            with libarchive.memory_reader(data, format_name="zip", passphrase=f"wrong-{i}") as archive:
                for entry in archive:
                    b"".join(entry.get_blocks())
            accepted = f"wrong-{i}"
            break
        except ArchiveError:
            continue
    assert accepted is not None, "no wrong password passed libarchive's check byte in 5000 tries"
    import io
    import zipfile
    locked = {i.filename: i for i in zipfile.ZipFile(io.BytesIO(data)).infolist()}
    assert open_encrypted_zip(data, locked, [Candidate(accepted)], 10**8, 10**8, 200) == (None, {})
    members = list(walk_zip(data, Budget(100, 10**8), 10**8, 200, Container(), [Candidate(accepted)]))
    assert [(m.encrypted, m.data, m.opened_with) for m in members] == [(True, None, None)]
    good = list(walk_zip(data, Budget(100, 10**8), 10**8, 200, Container(), [Candidate(accepted), Candidate(PASSWORD)]))
    assert good[0].data == b"quarterly numbers, nothing secret\n" * 50 and good[0].opened_with.password == PASSWORD


def test_words_of_a_message():
    assert words_of("pw: infected", 200)[:2] == ["infected", "pw: infected"]
    assert words_of("Le mot de passe est «Soleil42».", 200)[0] == "Soleil42"
    assert words_of(PASSWORD, 200) == [PASSWORD]
    assert words_of("x" * 300, 200) == []


def test_password_sent_before_the_file_in_either_direction(tmp_path, pipeline):
    """bob tells alice the password, then alice sends bob the zip (and the other way round): the pair is one
    conversation. The file's event names the message by its archive record, never the password itself."""
    for said, sent in ((BOB_TO_ALICE, ALICE_TO_BOB), (ALICE_TO_BOB, BOB_TO_ALICE)):
        password = f"{PASSWORD}-{said.sender[0]}"
        data = encrypted_zip(tmp_path, {"sample.com": EICAR}, password, "AES256")
        pipeline.check_message(f"the password is {password}", said)
        report, decision = pipeline.check_file(data, sent, name="sample.zip")
        assert decision.action == "block" and "malware" in decision.rule_ids, decision
        [(_, opened)] = findings(report, ENCRYPTED)
        assert opened.data["password_source"] == "conversation" and opened.data["message_position"] == BEFORE
        assert opened.data["message_sender"] == said.sender
        pipeline.archive.flush()
        with sqlite3.connect(f"file:{tmp_path / 'data' / 'archive.sqlite3'}?mode=ro", uri=True) as db:
            uids = db.execute("SELECT uid FROM records WHERE kind = 'message' AND text LIKE ?",
                              (f"%{password}",)).fetchall()
        assert [(opened.data["message_id"],)] == uids
    events = file_events(tmp_path / "data")
    assert len(events) == 2 and all(PASSWORD not in json.dumps(e) for e in events)


def test_password_after_the_file_is_waited_for(tmp_path):
    """The file is held (on an inspection thread, as the gateway's) until the next message of its conversation
    brings the password; the finding says it came after the file."""
    limits = InspectLimits(zip_password_wait=10.0)
    made = runtime.build_pipeline(ROOT / "rules", ROOT / "signatures", tmp_path / "data", limits=limits)
    try:
        data = encrypted_zip(tmp_path, {"notes.txt": b"minutes of the meeting\n" * 20}, PASSWORD)
        made.check_message("hello bob", ALICE_TO_BOB)           # messages come from this (the "event loop") thread
        result = {}
        worker = threading.Thread(target=lambda: result.update(zip=made.check_file(data, ALICE_TO_BOB, "m.zip")))
        started = time.monotonic()
        worker.start()
        time.sleep(0.5)
        made.check_message("unrelated chatter elsewhere", ChatContext(protocol="irc", sender="carol",
                                                                      recipients=("dave",)))
        made.check_message(f"pw {PASSWORD}", ALICE_TO_BOB)
        worker.join(15)
        report, decision = result["zip"]
        assert 0.5 <= time.monotonic() - started < 5
        assert decision.action == "allow", decision
        [(_, opened)] = findings(report, ENCRYPTED)
        assert opened.data["message_position"] == AFTER and "pw " not in json.dumps(opened.data)
    finally:
        made.close()


def test_no_wait_on_the_message_thread_and_the_window_expires(tmp_path):
    """On the thread that delivers messages (the replay, `imguard scan`) the file is not held; a password older
    than zip_password_window is not tried."""
    limits = InspectLimits(zip_password_wait=5.0, zip_password_window=0.3)
    made = runtime.build_pipeline(ROOT / "rules", ROOT / "signatures", tmp_path / "data", limits=limits)
    try:
        data = encrypted_zip(tmp_path, {"notes.txt": b"minutes\n" * 20}, PASSWORD)
        made.check_message(PASSWORD, ALICE_TO_BOB)
        time.sleep(0.5)
        started = time.monotonic()
        report, decision = made.check_file(data, ALICE_TO_BOB, "m.zip")
        assert time.monotonic() - started < 2
        assert decision.action == "block" and locked_members(report) == 1
        made.check_message(PASSWORD, ALICE_TO_BOB)
        report, decision = made.check_file(data, ALICE_TO_BOB, "m.zip")
        assert decision.action == "allow" and locked_members(report) == 0
    finally:
        made.close()


def test_memory_is_bounded_and_keys_conversations():
    memory = ConversationPasswords(window=60, max_messages=3, max_conversations=4)
    for i in range(5):
        memory.saw(f"word{i}", ALICE_TO_BOB, f"id{i}")
    _, found = memory.candidates(BOB_TO_ALICE)
    assert [c.password for c in found] == ["word4", "word3", "word2"]
    assert memory.candidates(ChatContext(sender="carol", recipients=("bob",)))[1] == []
    room = ChatContext(protocol="irc", sender="erin!e@h", recipients=("#ops",))
    memory.saw("roompass", room)
    assert [c.password for c in memory.candidates(ChatContext(sender="frank", recipients=("#OPS",)))[1]] == \
        ["roompass"]
    upload = ChatContext(protocol="xmpp", sender="alice/laptop", transfer_mechanism="xep-0363")
    # evicted: 4 keys kept (a message is kept under its pair and under each party)
    assert "word4" not in [c.password for c in memory.candidates(upload)[1]]


# --- through the real gateway: ngIRCd, `irc` clients, DCC SEND -----------------------------------------------

@pytest.fixture
def irc_route(request):
    """Through the real `imguard run` (test_e2e_irc's fixtures: ngIRCd, the gateway with its default settings:
    zip_passwords infected, zip_password_window 120 s, zip_password_wait 10 s), cleartext."""
    server, gateway = request.getfixturevalue("ircd"), request.getfixturevalue("irc_gateway")
    gateway.check_alive()
    log_offset = gateway.log_size()
    yield Route("imguard", False, server, gateway)
    gateway.check_alive()
    errors = gateway.errors_since(log_offset)
    assert not errors, "imguard logged errors during the test:\n" + "\n".join(errors) + "\n" + gateway.logs()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("when", [BEFORE, AFTER])
@pytest.mark.parametrize("sender_inside", [True, False], ids=["sender-inside", "sender-outside"])
def test_gateway_opens_the_zip_with_the_password_of_the_conversation(tmp_path, irc_route, when, sender_inside):
    """An AES zip holding EICAR goes by DCC between a user behind imguard and one outside it (each way). Its password
    is a private message of the same two people: the receiver's before the file, or the sender's after it (the held
    file waits for it, zip_password_wait). imguard opens the zip, finds EICAR and drops the transfer; the alert says
    which message held the password (its archive record), and no event carries the password."""
    password = f"Zq{os.urandom(6).hex()}"
    data = encrypted_zip(tmp_path, {"invoice.com": EICAR}, password, "AES256")
    with Chat(irc_route) as chat:
        alice = chat.person("alice", outside=not sender_inside)
        bob = chat.person("bob", outside=sender_inside)
        name = f"docs-{os.urandom(3).hex()}.zip"
        if when == BEFORE:
            bob.conn.privmsg(alice.nick, f"the password is {password}")
            assert chat.pump(lambda: any(password in text for _, text in alice.private), 15), alice.private
        t = chat.offer_file(alice, bob, name, data)
        if when == AFTER:
            # The gateway ACKs the bytes it holds: all of them ACKed, it has the whole file and inspects it. A moment
            # more, so the message cannot overtake the inspection's start on its way through the gateway.
            assert chat.pump(lambda: t.acked >= len(data), 15), f"ACKed {t.acked} of {len(data)}"
            chat.pump(lambda: False, 0.3)
            alice.conn.privmsg(bob.nick, f"pw: {password}")
        assert chat.pump(lambda: t.done, 40), (
            f"the transfer did not end: offer {t.offer}, {len(t.received)} bytes\n{irc_route.failure_logs()}")
        assert t.offer is not None and t.offer["port"] in irc_route.gateway.dcc_ports, t.offer
        assert bytes(t.received) == b"", f"{bob.nick} received {len(t.received)} bytes of the blocked zip"
        alert = irc_route.wait_alert(lambda e: e.get("file", {}).get("hash", {}).get("sha256") == sha256(data))
        assert alert and alert["event"]["action"] == "block", alert
        assert "malware" in alert["rule"]["id"], alert["rule"]
        opened = [f for member in alert["imguard"]["report"]["members"] for f in member["findings"]
                  if f["kind"] == "encrypted"]
        assert [f["data"]["message_position"] for f in opened] == [when], opened
        holder = alice if when == AFTER else bob
        assert opened[0]["data"]["message_sender"].split("!")[0] == holder.nick
        message = irc_route.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.message"
                                       and password in json.dumps(e))
        assert message is not None, "the gateway recorded no event of the message that held the password"
        assert all(password not in json.dumps(e) for e in irc_route.alerts()
                   if e.get("event", {}).get("dataset") == "imguard.file")
        chat.sentinel(alice, bob, "after the opened zip")


@pytest.mark.timeout(120)
def test_gateway_delivers_a_clean_zip_once_its_password_arrives(tmp_path, irc_route):
    """The same with a harmless document: without its password it would be blocked as unscannable; with the
    password sent after it, the held zip is opened, found clean and delivered byte-identical."""
    password = f"Zq{os.urandom(6).hex()}"
    data = encrypted_zip(tmp_path, {"minutes.txt": b"minutes of the meeting, nothing secret\n" * 100}, password)
    with Chat(irc_route) as chat:
        alice, bob = chat.person("alice"), chat.person("bob", outside=True)
        name = f"minutes-{os.urandom(3).hex()}.zip"
        t = chat.offer_file(alice, bob, name, data)
        chat.pump(lambda: t.offer is not None, 15)
        alice.conn.privmsg(bob.nick, password)
        assert chat.pump(lambda: t.done, 40), f"the transfer did not end\n{irc_route.failure_logs()}"
        assert bytes(t.received) == data, f"{len(t.received)} of {len(data)} bytes arrived"
        alert = irc_route.wait_alert(lambda e: e.get("file", {}).get("hash", {}).get("sha256") == sha256(data))
        assert alert and alert["event"]["action"] == "allow", alert
