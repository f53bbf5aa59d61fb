"""The retro-hunt (imguard/retrohunt.py) over the file store (imguard/filestore.py): a file allowed yesterday, a
signature published today, an alert naming who received it.

Unit tests drive a real Pipeline (real inspector, policy, archive, file store); the last tests run a real
`imguard run` in front of Prosody with slixmpp clients, reload it with a new signature, and run
`imguard retrohunt` on its data folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from imguard import runtime
from imguard.filestore import FileStore, FileStoreSettings
from imguard.model import ChatContext
from imguard.reload import PolicyReloader
from imguard.retrohunt import hunt, since_time

ROOT = Path(__file__).resolve().parents[1]
PYTHON = Path(sys.executable)
MARKER = "imguard-retrohunt-marker-5c1e"
SIGNATURE = f"""\
rule Retrohunt_Marker : malware
{{
    strings:
        $m = "{MARKER}"
    condition:
        $m
}}
"""
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
ALICE = ChatContext(protocol="xmpp", direction="internal", sender="alice@example.com",
                    recipients=("bob@example.com",), transfer_mechanism="ibb")
CAROL = ChatContext(protocol="irc", direction="internal", sender="carol!c@host", recipients=("dave",),
                    transfer_mechanism="dcc")


def read_events(data_dir: Path) -> list[dict]:
    path = data_dir / "alerts.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def retrohunt_events(data_dir: Path) -> list[dict]:
    return [e for e in read_events(data_dir) if e.get("event", {}).get("action") == "retrohunt"]


@pytest.fixture
def setup(tmp_path):
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules, ignore=shutil.ignore_patterns("tests"))
    signatures = tmp_path / "signatures"
    shutil.copytree(ROOT / "signatures", signatures)
    data = tmp_path / "data"
    pipeline = runtime.build_pipeline(rules, signatures, data)
    yield pipeline, rules, signatures, data
    pipeline.close()


def test_an_allowed_file_is_kept_content_addressed_and_private(setup):
    """Every allowed file's bytes are kept under files/<sha256[:2]>/<sha256>, 0600 in 0700 folders; a blocked one is
    the quarantine's, not stored twice."""
    pipeline, _, _, data = setup
    report, decision = pipeline.check_file(f"clean notes {uuid.uuid4()}".encode(), ALICE, name="notes.txt")
    assert decision.action == "allow"
    path = data / "files" / report.sha256[:2] / report.sha256
    assert path.read_bytes().startswith(b"clean notes")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 == stat.S_IMODE((data / "files").stat().st_mode)
    blocked, decision = pipeline.check_file(EICAR, ALICE, name="eicar.com")
    assert decision.blocked
    assert not (data / "files" / blocked.sha256[:2] / blocked.sha256).exists()
    assert pipeline.quarantine.read(blocked.sha256) == EICAR


def test_a_file_allowed_yesterday_is_found_by_todays_signature_and_names_its_receivers(setup):
    """Two sightings (XMPP alice -> bob, IRC carol -> dave) of one clean file; a reload adds a signature matching it;
    the background hunt raises one retrohunt alert naming both senders, both receivers and the rule. A file the new
    signature does not match raises nothing."""
    pipeline, rules, signatures, data = setup
    payload = f"quarterly figures {MARKER} {uuid.uuid4()}".encode()
    other = f"nothing to see {uuid.uuid4()}".encode()
    for ctx in (ALICE, CAROL):
        _, decision = pipeline.check_file(payload, ctx, name="figures.txt")
        assert decision.action == "allow"
    pipeline.check_file(other, ALICE, name="other.txt")
    _, decision = pipeline.check_file(EICAR, CAROL, name="eicar.com")         # blocked then: nothing new to say
    assert decision.blocked
    assert retrohunt_events(data) == []

    reloader = PolicyReloader(pipeline, [rules], signatures, data)
    (signatures / "retrohunt_marker.yar").write_text(SIGNATURE)
    assert reloader.reload("test") is True
    assert reloader.hunts is not None
    reloader.hunts.join(60)
    summary = reloader.hunts.last
    assert summary is not None and summary.files == 3 and summary.rescanned == 2, summary
    assert summary.outcomes["already_blocked"] == 1 and summary.outcomes["unchanged"] == 1, summary
    (event,) = retrohunt_events(data)
    assert event["event"]["dataset"] == "imguard.retrohunt" and event["event"]["kind"] == "alert"
    hunt_fields = event["imguard"]["retrohunt"]
    assert hunt_fields["senders"] == ["alice@example.com", "carol!c@host"]
    assert hunt_fields["recipients"] == ["bob@example.com", "dave"]
    assert hunt_fields["rules"] == ["malware"] and hunt_fields["yara_rules"] == ["Retrohunt_Marker"]
    assert hunt_fields["previous_actions"] == ["allow"] and hunt_fields["sightings_count"] == 2
    assert event["file"]["hash"]["sha256"] == __import__("hashlib").sha256(payload).hexdigest()
    assert {"alice@example.com", "carol!c@host", "bob@example.com", "dave"} <= set(event["related"]["user"])

    # The next signature change: the background hunt does not raise the same file for the same rule again;
    # asked on demand, it does.
    (signatures / "unrelated.yar").write_text(SIGNATURE.replace("Retrohunt_Marker", "Unrelated")
                                              .replace(MARKER, "nothing-crossed-with-this"))
    assert reloader.reload("test") is True
    reloader.hunts.join(60)
    assert reloader.hunts.last.outcomes["already_alerted"] == 1, reloader.hunts.last
    assert len(retrohunt_events(data)) == 1
    assert len(hunt(pipeline, since_time("1d")).alerts) == 1 and len(retrohunt_events(data)) == 2


def test_retention_removes_contents_but_keeps_hashes(setup, tmp_path):
    """Age and size retention delete the bytes, the index keeps the hash; a hunt then reports the hash as seen but
    not rescannable (and raises nothing for it)."""
    pipeline, _, signatures, data = setup
    store: FileStore = pipeline.filestore
    old, new = f"old {MARKER} {uuid.uuid4()}".encode(), f"new {uuid.uuid4()}".encode() * 10
    old_report, _ = pipeline.check_file(old, ALICE, name="old.txt")
    new_report, _ = pipeline.check_file(new, CAROL, name="new.txt")
    assert store.read(old_report.sha256) == old

    # Age: `old` stored 31 days ago (its clock set back), `new` now.
    store._db.execute("UPDATE files SET stored_at = stored_at - 31 * 86400 WHERE sha256 = ?", (old_report.sha256,))
    result = store.apply_retention()
    assert result.removed == 1 and result.freed == len(old)
    assert store.read(old_report.sha256) is None and store.read(new_report.sha256) == new
    assert not (data / "files" / old_report.sha256[:2] / old_report.sha256).exists()
    known = store.known(old_report.sha256)
    assert known is not None and known["stored"] is False and known["removed"] and known["size"] == len(old)

    # Size: a cap below the total deletes the oldest first.
    capped = FileStore(data / "files", FileStoreSettings(filestore_max_bytes=len(new) - 1))
    assert capped.apply_retention().removed == 1
    assert capped.read(new_report.sha256) is None and capped.known(new_report.sha256)["stored"] is False
    assert capped.count() == (2, 0)

    (signatures / "retrohunt_marker.yar").write_text(SIGNATURE)
    pipeline.archive.flush()        # another process's hunt (below) reads what this pipeline's writer has on disk
    fresh = runtime.build_pipeline(setup[1], signatures, data)
    try:
        summary = hunt(fresh, since_time("1d"))
    finally:
        fresh.close()
    assert summary.files == 2 and summary.rescanned == 0
    assert sorted(summary.not_kept) == sorted([old_report.sha256, new_report.sha256])
    assert retrohunt_events(data) == []


def test_since_parses_ages_and_dates():
    assert since_time("2026-12-01") == "2026-12-01T00:00:00+00:00"
    assert since_time("7d") < since_time("1h")
    with pytest.raises(ValueError):
        since_time("last week")


def test_a_retro_hunt_over_thousands_of_files_against_bench_inspects_small_file_throughput(setup):
    """2000 small files (200 B - 4 KB, as bench_inspect's section (b)) crossed; the hunt rescans them all. Prints its
    files/s beside the inspector's own small-file files/s on the same files in the same run (no timed assert)."""
    pipeline, rules, signatures, data = setup
    sys.path.insert(0, str(ROOT))
    from bench.bench_inspect import text_blob
    rng = random.Random(1234)
    files = [text_blob(rng.randint(200, 4096), rng) + f" {i}".encode() for i in range(2000)]
    files[1234] += MARKER.encode()
    for i, data_ in enumerate(files):
        pipeline.check_file(data_, ALICE if i % 2 else CAROL, name=f"small_{i}.txt")
    inspector = pipeline.inspector
    started = time.perf_counter()
    for i, data_ in enumerate(files):
        inspector.inspect(data_, ALICE, name=f"small_{i}.txt")
    bench_rate = len(files) / (time.perf_counter() - started)

    (signatures / "retrohunt_marker.yar").write_text(SIGNATURE)
    pipeline.archive.flush()        # the fresh pipeline (as `imguard retrohunt` would) reads what is on disk
    fresh = runtime.build_pipeline(rules, signatures, data)
    try:
        summary = hunt(fresh, since_time("1d"))
        two = hunt(fresh, since_time("1d"), workers=2)
    finally:
        fresh.close()
    for result in (summary, two):
        assert result.files == len(files) and result.rescanned == len(files), result.to_dict()
        assert len(result.alerts) == 1 and result.alerts[0]["file"]["name"] == "small_1234.txt"
    hunt_rate = summary.rescanned / summary.seconds
    print(f"\nretro-hunt: {summary.rescanned} files in {summary.seconds:.2f}s = {hunt_rate:.0f} files/s (1 thread), "
          f"{two.rescanned / two.seconds:.0f} files/s (2 threads); Inspector.inspect on the same small files "
          f"(bench_inspect (b), 1 thread): {bench_rate:.0f} files/s; ratio {hunt_rate / bench_rate:.2f}")


# --- through a real `imguard run` ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hunt_gateway(prosody, peers_dir):
    from tests.peers.gateway import Gateway
    directory = peers_dir / f"imguard-retrohunt-{uuid.uuid4().hex[:6]}"
    signatures = directory / "signatures"
    shutil.copytree(ROOT / "signatures", signatures)
    gw = Gateway.start(directory, prosody, extra=["--signatures", str(signatures), "--reload-interval", "0"])
    gw.signatures = signatures
    try:
        yield gw
    finally:
        gw.stop()


INSIDE, INBOUND, OUTBOUND = "inside", "inbound", "outbound"


@pytest.mark.parametrize("crossing", [INSIDE, INBOUND, OUTBOUND])
def test_a_clean_file_crosses_then_a_new_signature_raises_a_retrohunt_alert_naming_sender_and_receiver(
        prosody, hunt_gateway, crossing):
    """alice sends bob a clean file over IBB through the gateway (both behind it; alice outside, straight to
    Prosody; bob outside): bob gets it whole. A signature matching it is added and the gateway reloaded (SIGHUP):
    a retrohunt alert names alice, bob and the rule. `imguard retrohunt --since 1d` on the same data folder, run
    beside the gateway, finds the same."""
    from tests.xmpp_clients import STARTTLS, Client, Endpoint
    gw = hunt_gateway
    since = gw.mark()
    tag = uuid.uuid4().hex[:6]
    marker = f"imguard-retrohunt-{tag}-{crossing}"
    rule = f"Retrohunt_{tag}_{crossing}"
    payload = f"meeting notes {tag} {marker}\n".encode() * 20
    inside = gw.endpoint(STARTTLS)
    outside = Endpoint("127.0.0.1", prosody.c2s_port, STARTTLS, ca_file=prosody.ca_file)
    alice_at = outside if crossing == INBOUND else inside
    bob_at = outside if crossing == OUTBOUND else inside

    async def send():
        async with Client.connected(alice_at, f"alice@localhost/h-{tag}", prosody.password("alice")) as alice, \
                Client.connected(bob_at, f"bob@localhost/h-{tag}", prosody.password("bob")) as bob:
            result = await alice.ibb_send(bob.jid, payload, name=f"notes-{tag}.txt")
            assert result.completed and not result.error, result
            await bob.wait_for(lambda r: result.sid in r.ibb_closed, timeout=10)
            assert bytes(bob.received.ibb.get(result.sid, b"")) == payload, "the clean file did not arrive whole"

    asyncio.run(send())
    allowed = asyncio.run(gw.wait_alert(lambda e: e.get("file", {}).get("name") == f"notes-{tag}.txt", since=since))
    assert allowed and allowed["event"]["action"] == "allow", allowed
    sha256 = allowed["file"]["hash"]["sha256"]
    assert sha256 == __import__("hashlib").sha256(payload).hexdigest()        # the bytes bob got

    def hunted_this(e: dict) -> bool:
        return e.get("event", {}).get("action") == "retrohunt" and e["file"]["hash"]["sha256"] == sha256

    (gw.signatures / f"retrohunt_{tag}.yar").write_text(SIGNATURE.replace("Retrohunt_Marker", rule)
                                                       .replace(MARKER, marker))
    os.kill(gw.process.pid, signal.SIGHUP)
    event = asyncio.run(gw.wait_alert(hunted_this, since=since, timeout=60))
    assert event, gw.logs()
    hunted = event["imguard"]["retrohunt"]
    assert [s.split("/")[0] for s in hunted["senders"]] == ["alice@localhost"], hunted
    assert [r.split("/")[0] for r in hunted["recipients"]] == ["bob@localhost"], hunted
    assert hunted["rules"] == ["malware"] and hunted["yara_rules"] == [rule], hunted
    assert hunted["previous_actions"] == ["allow"]
    gw.check_alive()

    mark = gw.mark()
    result = subprocess.run([str(PYTHON), "-m", "imguard", "retrohunt", "--since", "1d", "--json",
                             "--signatures", str(gw.signatures), "--rules", str(gw.directory / "rules"),
                             "--data-dir", str(gw.data_dir)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["now_blocked"] >= 1 and summary["rescanned"] >= 1, summary
    again = asyncio.run(gw.wait_alert(hunted_this, since=mark))
    assert again, result.stdout
    assert again["imguard"]["retrohunt"]["senders"] == hunted["senders"]
    assert again["imguard"]["retrohunt"]["recipients"] == hunted["recipients"]
