"""The tamper-evident archive end to end: a real ngIRCd, `irc` library clients, the real `imguard run`, and the real
`imguard archive verify` command on the data folder the running gateway writes."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import time
import uuid

import pytest

from tests.test_e2e_irc import EICAR, Chat, Route, irc_dir, irc_gateway, ircd  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(180)


def _verify(data_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imguard", "archive", "verify", "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=60)


def test_what_the_running_gateway_archives_verifies_and_tampering_is_named(ircd, irc_gateway):  # noqa: F811
    route = Route("imguard", False, ircd, irc_gateway)
    text = f"for the record {uuid.uuid4().hex[:6]}"
    with Chat(route) as chat:
        alice, bob = chat.person("alice"), chat.person("bob")
        alice.conn.privmsg(bob.nick, text)
        assert chat.pump(lambda: (alice.nick, text) in bob.private, 15), route.failure_logs()
        transfer = chat.offer_file(alice, bob, f"eicar-{uuid.uuid4().hex[:6]}.com", EICAR)
        assert chat.pump(lambda: transfer.done, 20), route.failure_logs()
        assert bytes(transfer.received) == b""
        chat.sentinel(alice, bob, "after the blocked file")
    database = irc_gateway.data_dir / "archive.sqlite3"
    eicar_sha256 = hashlib.sha256(EICAR).hexdigest()
    deadline = time.monotonic() + 15
    while True:         # the writer thread stores records within a moment
        db = sqlite3.connect(database)
        found = db.execute("SELECT id, chain_seq FROM records WHERE text = ?", (text,)).fetchall(), \
            db.execute("SELECT id FROM records WHERE sha256 = ?", (eicar_sha256,)).fetchall()
        db.close()
        if all(found) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all(found), f"the gateway did not archive the message and the file: {found}"
    record_id, seq = found[0][0]        # both parties are inside: each connection's copy is recorded
    result = _verify(irc_gateway.data_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 files verified" in result.stdout and "archive verified" in result.stdout

    db = sqlite3.connect(database)
    db.execute("UPDATE records SET text = 'never said' WHERE id = ?", (record_id,))
    db.commit()
    db.close()
    quarantined = irc_gateway.data_dir / "quarantine" / eicar_sha256[:2] / eicar_sha256
    quarantined.write_bytes(b"replaced evidence")
    result = _verify(irc_gateway.data_dir)
    assert result.returncode == 1, result.stdout
    tampered = [line for line in result.stdout.splitlines() if line.startswith("TAMPERED")]
    assert any(f"seq {seq} (record id {record_id}" in line and "altered" in line for line in tampered), tampered
    assert any(f"quarantined file {eicar_sha256}" in line and "altered" in line for line in tampered), tampered
