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


# --- members with passwords of their own, said in messages of their own (issue 18) ---------------------------

def zip_of_passwords(tmp_path: Path, members: list[tuple[str, bytes, str]], method: str = "AES256") -> bytes:
    """A zip whose members each have their own password: 7-Zip adds them one at a time, each with its `-p`; they
    must be given in the order 7-Zip keeps (by name), so that the first member is the first password's."""
    folder = tmp_path / f"src-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    out = folder.with_suffix(".zip")
    for name, content, password in members:
        (folder / name).write_bytes(content)
        subprocess.run([seven_zip(), "a", "-tzip", f"-mem={method}", f"-p{password}", str(out), name], cwd=folder,
                       check=True, capture_output=True)
    import io
    import zipfile
    data = out.read_bytes()
    assert [i.filename for i in zipfile.ZipFile(io.BytesIO(data)).infolist()] == [m[0] for m in members]
    return data


@pytest.mark.parametrize("method", ["ZipCrypto", "AES256"])
def test_each_member_opens_with_its_own_password_in_either_order(tmp_path, method):
    """Two members, two passwords: both are opened whichever candidate comes first, each with its own (7-Zip's
    listing says both are encrypted). A wrong password's try stops at the first locked member, so the second's
    password alone opens nothing: the archive stays locked (unscannable), never partly passed."""
    first, second = f"{PASSWORD}-one", f"{PASSWORD}-two"
    data = zip_of_passwords(tmp_path, [("a.txt", b"minutes one\n" * 40, first), ("b.txt", b"minutes two\n" * 40,
                                                                                  second)], method)
    (tmp_path / "two.zip").write_bytes(data)
    listing = subprocess.run([seven_zip(), "l", "-slt", str(tmp_path / "two.zip")], capture_output=True,
                             text=True).stdout
    assert listing.count("Encrypted = +") == 2, listing
    for order in ((first, second), (second, first), ("wrong", second, "wrong2", first)):
        members = list(walk_zip(data, Budget(100, 10**8), 10**8, 200, Container(), [Candidate(p) for p in order]))
        assert [(m.name, m.data, m.opened_with.password) for m in members] == [
            ("a.txt", b"minutes one\n" * 40, first), ("b.txt", b"minutes two\n" * 40, second)], order
    members = list(walk_zip(data, Budget(100, 10**8), 10**8, 200, Container(), [Candidate(second)]))
    assert [(m.name, m.data, m.opened_with) for m in members] == [("a.txt", None, None), ("b.txt", None, None)]


def said_in(password: str, message_id: str, position: str = AFTER) -> Candidate:
    return Candidate(password, "conversation", 0, message_id, "alice!a@10.0.0.1", "2026-01-01T00:00:00.000Z",
                     position)


def test_the_pool_keeps_every_candidate_of_the_window_bounded():
    """passwords.pool: the words of the messages that opened a member first, then the newest message's, then the
    earlier ones; each password once; at most `limit` (zip_password_tries less the configured list: room())."""
    from imguard.inspect.passwords import pool, room
    old = [said_in("alpha", "m1"), said_in("pw", "m1")]
    new = [said_in("bravo", "m2"), said_in("pw", "m2")]
    assert [c.password for c in pool(old, new, 10)] == ["bravo", "pw", "alpha"]
    assert [(c.password, c.message_id) for c in pool(old, new, 10, [old[0].facts()])] == [
        ("alpha", "m1"), ("pw", "m1"), ("bravo", "m2")]
    assert [c.password for c in pool(old, new, 2, [old[0].facts()])] == ["alpha", "pw"]
    assert pool(old, new, 0) == []
    inspector = Inspector.__new__(Inspector)
    inspector.limits, inspector.zip_passwords = InspectLimits(zip_password_tries=5), (Candidate("infected"),)
    assert room(inspector) == 4


@pytest.mark.parametrize("infected", [False, True], ids=["clean", "eicar-in-the-second"])
def test_passwords_in_separate_messages_after_the_file_open_every_member(tmp_path, infected):
    """The file, then one message with the first member's password, then (after the first retry opened that member)
    another with the second's: the second retry keeps the first message's words, so both members open and are
    scanned (EICAR in the second blocks it). Each finding names its own message; neither carries a password."""
    limits = InspectLimits(zip_password_wait=10.0)
    made = runtime.build_pipeline(ROOT / "rules", ROOT / "signatures", tmp_path / "data", limits=limits)
    first, second = f"Zq{os.urandom(5).hex()}", f"Zq{os.urandom(5).hex()}"
    data = zip_of_passwords(tmp_path, [("minutes.txt", b"minutes of the meeting\n" * 30, first),
                                       ("tool.com" if infected else "notes.txt",
                                        EICAR if infected else b"notes, nothing secret\n" * 30, second)])
    try:
        made.check_message("hello bob", ALICE_TO_BOB)
        result = {}
        worker = threading.Thread(target=lambda: result.update(zip=made.check_file(data, ALICE_TO_BOB, "two.zip")))
        worker.start()
        time.sleep(0.5)
        made.check_message(f"the first one is {first}", ALICE_TO_BOB)
        time.sleep(1.0)         # the first retry is done (milliseconds): one member open, one locked
        assert worker.is_alive(), "the file was decided before the second password came"
        made.check_message(f"pw for the other: {second}", ALICE_TO_BOB)
        worker.join(15)
        report, decision = result["zip"]
        assert locked_members(report) == 0 and not findings(report, UNSCANNABLE), report.to_dict()
        opened = {p: f.data for p, f in findings(report, ENCRYPTED)}
        assert len(opened) == 2 and len({d["message_id"] for d in opened.values()}) == 2, opened
        assert all(d["message_position"] == AFTER for d in opened.values())
        if infected:
            assert decision.action == "block" and "malware" in decision.rule_ids, decision
            assert [p for p, _ in findings(report, YARA_MATCH)] == ["two.zip!tool.com"]
        else:
            assert decision.action == "allow", decision
        events = file_events(tmp_path / "data")
        assert all(first not in json.dumps(e) and second not in json.dumps(e) for e in events)
    finally:
        made.close()


def _gateway_two_passwords(tmp_path, irc_route, sender_inside: bool, infected: bool) -> None:
    first, second = f"Zq{os.urandom(6).hex()}", f"Zq{os.urandom(6).hex()}"
    data = zip_of_passwords(tmp_path, [("minutes.txt", b"minutes of the meeting, nothing secret\n" * 50, first),
                                       ("tool.com" if infected else "notes.txt",
                                        EICAR if infected else b"notes, nothing secret\n" * 50, second)])
    with Chat(irc_route) as chat:
        alice = chat.person("alice", outside=not sender_inside)
        bob = chat.person("bob", outside=sender_inside)
        t = chat.offer_file(alice, bob, f"two-{os.urandom(3).hex()}.zip", data)
        assert chat.pump(lambda: t.acked >= len(data), 15), f"ACKed {t.acked} of {len(data)}"
        chat.pump(lambda: False, 0.3)
        alice.conn.privmsg(bob.nick, f"minutes: {first}")
        chat.pump(lambda: False, 1.0)       # the gateway tries it: one member opens, the other stays locked
        alice.conn.privmsg(bob.nick, f"and the notes: {second}")
        assert chat.pump(lambda: t.done, 40), (
            f"the transfer did not end: offer {t.offer}, {len(t.received)} bytes\n{irc_route.failure_logs()}")
        assert t.offer is not None and t.offer["port"] in irc_route.gateway.dcc_ports, t.offer
        alert = irc_route.wait_alert(lambda e: e.get("file", {}).get("hash", {}).get("sha256") == sha256(data))
        assert alert is not None, irc_route.failure_logs()
        opened = {m["path"].rsplit("!", 1)[1]: f["data"] for m in alert["imguard"]["report"]["members"]
                  for f in m["findings"] if f["kind"] == "encrypted" and f["data"].get("password_source")}
        assert sorted(opened) == ["minutes.txt", "tool.com" if infected else "notes.txt"], alert
        assert len({d["message_id"] for d in opened.values()}) == 2 and all(
            d["message_position"] == AFTER and d["message_sender"].split("!")[0] == alice.nick
            for d in opened.values()), opened
        assert all(first not in json.dumps(e) and second not in json.dumps(e) for e in irc_route.alerts()
                   if e.get("event", {}).get("dataset") == "imguard.file")
        if infected:
            assert alert["event"]["action"] == "block" and "malware" in alert["rule"]["id"], alert
            assert bytes(t.received) == b"", f"{bob.nick} received {len(t.received)} bytes of the blocked zip"
            chat.sentinel(alice, bob, "after the zip of two passwords")
        else:
            assert alert["event"]["action"] == "allow", alert
            assert bytes(t.received) == data, f"{len(t.received)} of {len(data)} bytes arrived"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sender_inside", [True, False], ids=["sender-inside", "sender-outside"])
def test_gateway_blocks_eicar_behind_the_second_of_two_passwords(tmp_path, irc_route, sender_inside):
    """Through the real gateway (ngIRCd, DCC): an AES zip whose first member has one password and whose second,
    EICAR, another; each password is its own private message after the file, the first's tried before the second
    comes. imguard opens both, finds EICAR in the second, drops the transfer; each member's finding names its own
    message; a sentinel follows. (Retried with the newest message's words only, the first member locked again and
    EICAR was never seen.)"""
    _gateway_two_passwords(tmp_path, irc_route, sender_inside, infected=True)


@pytest.mark.timeout(120)
def test_gateway_delivers_a_clean_zip_of_two_passwords(tmp_path, irc_route):
    """The same with two harmless members: opened with both messages, found clean, delivered byte-identical."""
    _gateway_two_passwords(tmp_path, irc_route, sender_inside=False, infected=False)
