"""Wiring, seen from outside a running `imguard run`: what the quarantine, the archive and /metrics hold after real
traffic, and the fail modes keyed by real protocols (`xmpp:parse`, `irc:timeout`, `irc:overload`) with real peers.

Real parts only: slixmpp clients through the gateway to a real Prosody, `irc` library clients (DCC through the
gateway's relay) to a real ngIRCd. Each test starts its own gateway (the settings differ: a quarantine rule, a
metrics listener, fail modes, a tiny inspection queue) with the peers and helpers of the end-to-end tests
(tests/peers/, tests/test_e2e_xmpp.py, tests/test_e2e_irc.py). What is asserted comes from independent sources:
the bytes the clients sent, the files on disk, `imguard archive search` as an operator runs it, and /metrics
parsed by prometheus_client's own parser.

Two test-only additions to the gateway's configuration (written into its folders, never into the project's):
- a rule `wiring-quarantine` (action quarantine, files named `hold-*`);
- a YARA signature `wiring_slow_scan` that takes seconds on a file starting with `WIRJ` (nested loops, no match
  on anything else): a file "built to scan slowly", which is what the timeout and overload fail modes are for.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.peers.gateway import BUNDLED_SIGNATURES, PYTHON, Gateway
from tests.peers.ngircd import IrcGateway
from tests.peers.prosody import free_ports
from tests.test_e2e_irc import Chat, across, assert_parties
from tests.test_e2e_irc import Route as IrcRoute
from tests.test_e2e_irc import irc_dir, ircd  # noqa: F401 - the module fixtures: one ngIRCd for these tests too
from tests.test_e2e_xmpp import BLOCKED_WORD, CLEAN, EICAR, Outside, sentinel_after, transfer
from tests.test_e2e_xmpp import Route as XmppRoute
from tests.xmpp_clients import STARTTLS

prometheus_parser = pytest.importorskip("prometheus_client.parser", reason="pip install prometheus_client (test extra)")

pytestmark = pytest.mark.timeout(180)

QUARANTINE_RULE = "wiring-quarantine"
WIRING_RULES = f"""\
# Test-only (tests/test_wiring.py): a file named hold-* is kept for review, not delivered.
rules:
  - id: {QUARANTINE_RULE}
    title: Held for review (test)
    severity: medium
    action: quarantine
    applies_to: file
    notify: "Your file {{file.name}} was held for review."
    match:
      name: "hold-*"
"""
# A scan of 48 million loop steps (3-5 s here) on a file that starts with WIRJ; nothing else is slowed.
SLOW_SIGNATURE = """\
rule wiring_slow_scan
{
    meta:
        description = "test-only (tests/test_wiring.py): scans slowly on purpose, matches nothing else"
    condition:
        uint32be(0) == 0x5749524a and
        for all i in (0..5999) : ( for all j in (0..7999) : ( uint16(j % 8) != i + 0x10000 ) )
}
"""
SLOW_FILE = b"WIRJ" + b"built to scan slowly, otherwise harmless\n" * 20


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prepare(directory: Path, slow_signature: bool = False) -> list[str]:
    """The gateway folder's extra rule file (Gateway.start and IrcGateway.start add the bundled and test rules to
    the same folder) and, with `slow_signature`, a signatures folder of the bundled ones plus the slow one.
    Returns the extra `imguard run` arguments."""
    rules = directory / "rules"
    rules.mkdir(parents=True, exist_ok=True)
    (rules / "95-wiring.yaml").write_text(WIRING_RULES)
    if not slow_signature:
        return []
    signatures = directory / "signatures"
    shutil.copytree(BUNDLED_SIGNATURES, signatures, dirs_exist_ok=True)
    (signatures / "wiring_slow.yar").write_text(SLOW_SIGNATURE)
    # The slow scan takes seconds (more on a busy machine): YARA's own timeout is not what these tests are about.
    return ["--signatures", str(signatures), "--scan-timeout", "60"]


def stop(gw) -> None:
    status = gw.stop()
    if gw.crashed:
        pytest.fail(f"imguard run exited by itself with status {status}:\n{gw.logs()}")


def no_errors(gw, offset: int) -> None:
    gw.check_alive()
    errors = gw.errors_since(offset)
    assert not errors, "imguard logged errors during the test:\n" + "\n".join(errors) + "\n" + gw.logs()


def run(coro):
    return asyncio.run(coro)


def fail_mode_of(event: dict) -> dict | None:
    return event.get("imguard", {}).get("fail_mode")


# --- /metrics, read as Prometheus reads it ---------------------------------------------------------------------

def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed by prometheus_client's parser: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples: dict[tuple[str, tuple], float] = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


def moved_series(before: dict, after: dict, name: str) -> dict[tuple, float]:
    """Every series of `name` that moved, by its labels."""
    keys = {k for k in (*before, *after) if k[0] == name}
    return {labels: after.get((n, labels), 0) - before.get((n, labels), 0)
            for n, labels in sorted(keys) if after.get((n, labels), 0) != before.get((n, labels), 0)}


# --- the archive, searched as an operator does -------------------------------------------------------------------

def archive_search(gw, *args: str, count: int = 0, timeout: float = 15.0) -> list[dict]:
    """`imguard archive search ARGS` on `gw`'s data folder: its rows. The gateway's archive writer stores records
    behind the chat (a queue and a thread), so with `count` the search is repeated until it returns that many."""
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run([str(PYTHON), "-m", "imguard", "archive", "search", "--data-dir", str(gw.data_dir),
                                 "--format", "jsonl", *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"imguard archive search {' '.join(args)} failed: {result.stderr}"
        rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


# --- XMPP: quarantine, archive and /metrics of a running gateway --------------------------------------------------

@pytest.fixture(scope="module")
def metered_gateway(peers_dir, prosody):
    """`imguard run` in front of `prosody` with the wiring rule and /metrics on a free loopback port."""
    directory = peers_dir / "imguard-wiring"
    extra = prepare(directory)
    (metrics_port,) = free_ports(1)
    gw = Gateway.start(directory, prosody, extra=[*extra, "--metrics-listen", f"127.0.0.1:{metrics_port}"])
    gw.metrics_port = metrics_port
    try:
        yield gw
    finally:
        stop(gw)


def test_running_gateway_fills_quarantine_archive_and_metrics(prosody, metered_gateway):
    """Real traffic through a running gateway: alice (inside) sends bob (inside) plain messages, one blocked
    message, a clean file, a file the `wiring-quarantine` rule holds and EICAR, by IBB. Then: the held and the
    blocked file are in the quarantine (their bytes' SHA-256 is the sent file's, the sidecar names both parties,
    mode 0600), `imguard archive search` finds every message and file, and /metrics moved by exactly that."""
    gw = metered_gateway
    offset = gw.log_size()
    route = XmppRoute("imguard", STARTTLS, prosody, gw)
    tag = uuid.uuid4().hex[:6]
    plain = [f"wiring {tag} message {i}" for i in range(3)]
    blocked = f"wiring {tag}: the {BLOCKED_WORD} launch"
    held = b"for review only " + tag.encode() + bytes(range(256)) * 4
    files = {f"clean-{tag}.bin": CLEAN, f"hold-{tag}.bin": held, f"eicar-{tag}.com": EICAR}
    before = scrape(gw.metrics_port)
    seen: dict[str, dict] = {}

    async def scenario():
        async with route.client("alice") as alice, route.client("bob") as bob:
            for text in plain:
                alice.send_chat(bob.jid, text)
                assert await bob.wait_message(text), f"bob never got {text!r}"
            alice.send_chat(bob.jid, blocked)
            await sentinel_after(alice, bob, "after the blocked message")
            assert blocked not in bob.bodies()
            for name, data in files.items():
                seen[name] = await transfer(route, "ibb", alice, bob, name, data)
            await sentinel_after(alice, bob, "after the files")
    run(scenario())
    alice, bob = route.bare("alice"), route.bare("bob")
    assert seen[f"clean-{tag}.bin"]["received"] == CLEAN, "the clean file did not arrive"
    assert seen[f"hold-{tag}.bin"]["received"] == b"", "the held file reached bob"
    assert seen[f"eicar-{tag}.com"]["received"] == b"", "EICAR reached bob"

    # The quarantine: the held file and EICAR, content-addressed, private, with both parties.
    for name, action in ((f"hold-{tag}.bin", "quarantine"), (f"eicar-{tag}.com", "block")):
        assert_quarantined(gw, files[name], name, action, alice, bob)
    clean = gw.data_dir / "quarantine" / sha256(CLEAN)[:2] / sha256(CLEAN)
    assert not clean.exists(), "the clean file was quarantined"

    # The archive, as an operator searches it. Both parties are inside: a delivered message or file is recorded on
    # each leg it crossed (alice's connection, outbound; bob's, inbound), a stopped one on alice's leg only.
    rows = archive_search(gw, "--person", alice, "--text", f"wiring {tag}", count=7)
    legs = sorted((r["text"], r["direction"], r["action"]) for r in rows if r["kind"] == "message")
    expected = sorted([*((t, d, "allow") for t in plain for d in ("outbound", "inbound")),
                       (blocked, "outbound", "block")])
    assert legs == expected, f"the archive holds {legs}"
    assert all(r["protocol"] == "xmpp" and r["sender"] == alice and bob in r["recipients"] for r in rows), rows
    for name, data, want in ((f"clean-{tag}.bin", CLEAN, {("outbound", "allow"), ("inbound", "allow")}),
                             (f"hold-{tag}.bin", held, {("outbound", "quarantine")}),
                             (f"eicar-{tag}.com", EICAR, {("outbound", "block")})):
        found = archive_search(gw, "--sha256", sha256(data), "--person", bob, count=len(want))
        assert {(r["direction"], r["action"]) for r in found} == want and len(found) == len(want), found
        assert all(r["file_name"] == name and r["file_size"] == len(data) and r["mechanism"] == "ibb"
                   and r["sender"] == alice for r in found), found

    # /metrics moved by exactly this traffic: 5 messages delivered (3 plain, 2 sentinels), each decided on both legs;
    # 1 blocked on alice's leg; the clean file inspected on both legs, the held and the blocked one on alice's only
    # (EICAR as `.com` matches two rules); two client connections. Nothing else moved.
    after = scrape(gw.metrics_port)
    size = 2 * len(CLEAN) + len(held) + len(EICAR)
    assert moved_series(before, after, "imguard_messages_total") == {
        (("action", "allow"),): 10, (("action", "block"),): 1}
    assert moved_series(before, after, "imguard_files_total") == {
        (("action", "allow"),): 2, (("action", "quarantine"),): 1, (("action", "block"),): 1}
    assert moved_series(before, after, "imguard_decisions_total") == {
        (("action", "allow"), ("kind", "message"), ("rule", "")): 10,
        (("action", "block"), ("kind", "message"), ("rule", "test-codename-block")): 1,
        (("action", "allow"), ("kind", "file"), ("rule", "")): 2,
        (("action", "quarantine"), ("kind", "file"), ("rule", QUARANTINE_RULE)): 1,
        (("action", "block"), ("kind", "file"), ("rule", "malware")): 1,
        (("action", "block"), ("kind", "file"), ("rule", "executable-external")): 1}
    assert moved_series(before, after, "imguard_connections_total") == {(("protocol", "xmpp"),): 2}
    assert moved(before, after, "imguard_file_bytes_total") == size
    assert moved(before, after, "imguard_file_size_bytes_count") == 4
    assert moved(before, after, "imguard_file_size_bytes_sum") == size
    assert moved(before, after, "imguard_inspection_seconds_count") == 4
    assert moved_series(before, after, "imguard_anomalies_total") == {}
    assert moved_series(before, after, "imguard_tls_failures_total") == {}
    no_errors(gw, offset)


def assert_quarantined(gw, data: bytes, name: str, action: str, sender: str, recipient: str) -> dict:
    """`data` is in `gw`'s quarantine under its SHA-256, private (0600 in a 0700 folder), with a sighting that names
    `sender` and `recipient` (bare JIDs or nicks) and `action`; the file's alert points at it. Returns the sidecar."""
    digest = sha256(data)
    path = gw.data_dir / "quarantine" / digest[:2] / digest
    assert path.is_file(), f"{name} ({action}) is not in the quarantine: {sorted(gw.data_dir.rglob('*'))}"
    assert sha256(path.read_bytes()) == digest
    sidecar = Path(str(path) + ".json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(sidecar.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((gw.data_dir / "quarantine").stat().st_mode) == 0o700
    record = json.loads(sidecar.read_text())
    assert record["report"]["name"] == name and record["report"]["size"] == len(data), record["report"]
    assert record["report"]["sha256"] == digest
    sightings = [s for s in record["sightings"] if s["context"].get("sender", "").split("/")[0] == sender]
    assert sightings, f"no sighting names {sender} as the sender: {record['sightings']}"
    assert any(r.split("/")[0] == recipient for s in sightings for r in s["context"]["recipients"]), sightings
    assert {s["decision"]["action"] for s in sightings} == {action}, sightings
    alert = next((e for e in gw.alerts() if e.get("file", {}).get("hash", {}).get("sha256") == digest
                  and e["event"].get("action") == action), None)
    assert alert and alert["imguard"].get("quarantine_path") == str(path), alert
    return record


def test_file_from_outside_in_is_quarantined_on_the_receivers_leg(prosody, metered_gateway):
    """The other side: alice outside (straight to Prosody) sends bob inside a file the rule holds; bob's leg of the
    running gateway keeps it from him and in the quarantine, naming alice as the sender and bob as the receiver."""
    gw = metered_gateway
    offset = gw.log_size()
    route = XmppRoute("imguard", STARTTLS, prosody, gw)
    tag = uuid.uuid4().hex[:6]
    name, data = f"hold-in-{tag}.bin", b"inbound, for review " + tag.encode() + bytes(range(255, -1, -1)) * 3
    before = scrape(gw.metrics_port)

    async def scenario():
        async with Outside(prosody).client(route.account("alice")) as alice, route.client("bob") as bob:
            seen = await transfer(route, "ibb", alice, bob, name, data)
            await sentinel_after(alice, bob, "after the held file")
            return seen
    seen = run(scenario())
    assert seen["received"] == b"", "the held file reached bob"
    assert_quarantined(gw, data, name, "quarantine", route.bare("alice"), route.bare("bob"))
    [row] = archive_search(gw, "--sha256", sha256(data), count=1)
    assert (row["direction"], row["action"], row["file_name"]) == ("inbound", "quarantine", name), row
    after = scrape(gw.metrics_port)
    assert moved_series(before, after, "imguard_files_total") == {(("action", "quarantine"),): 1}
    assert moved_series(before, after, "imguard_messages_total") == {(("action", "allow"),): 1}    # the sentinel
    assert moved_series(before, after, "imguard_connections_total") == {(("protocol", "xmpp"),): 1}
    no_errors(gw, offset)


# --- fail mode xmpp:parse, with Prosody and slixmpp ----------------------------------------------------------------
# A session's contract is that no input makes it fail: what its decoder recognises as broken (malformed XML, a
# stanza over the limit) ends that stream as the server itself would, whatever the fail mode (docs/deploy.md, fail
# modes), and the fuzzers hold the sessions to it. So `parse` is about imguard failing; to make it fail on a real
# stream, the gateway process is started with a fault hook (a sitecustomize on its PYTHONPATH) that makes the
# XMPP session raise on a client read holding a marker, as a decoder bug would.

FAULT_MARKER = "wiring-decoder-fault"
FAULT_HOOK = f"""\
# Test-only (tests/test_wiring.py): the XMPP session raises on a client read that holds the marker.
from imguard.protocols.xmpp import session as _session

_steps = _session.XmppSession.data_received_steps


def _failing_steps(self, from_client, data):
    if from_client and {FAULT_MARKER.encode()!r} in bytes(data):
        raise RuntimeError("injected decoder fault (tests/test_wiring.py)")
    yield from _steps(self, from_client, data)


_session.XmppSession.data_received_steps = _failing_steps
"""


@pytest.fixture(params=["open", "closed"])
def parse_gateway(request, peers_dir, prosody, monkeypatch):
    mode = request.param
    directory = peers_dir / f"imguard-parse-{mode}-{uuid.uuid4().hex[:6]}"
    hook = directory / "fault-hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(FAULT_HOOK)
    with monkeypatch.context() as env:          # only the gateway's process gets the hook
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
        gw = Gateway.start(directory, prosody, extra=["--fail-mode", f"xmpp:parse={mode}"])
    gw.fail_mode = mode
    try:
        yield gw
    finally:
        stop(gw)


def test_xmpp_parse_fail_mode_with_real_peers(prosody, parse_gateway):
    """alice (inside) sends bob (outside) a message that makes her session fail, then a message the policy blocks.
    xmpp:parse=open: both reach bob (the rest of her connection is relayed uninspected: no record of the second),
    one `session_error` alert says fail mode open. xmpp:parse=closed: her connection is closed, bob gets neither,
    one `session_error` alert. Either way carol (inside) keeps chatting with bob through the same gateway."""
    gw, mode = parse_gateway, parse_gateway.fail_mode
    offset = gw.log_size()
    route = XmppRoute("imguard", STARTTLS, prosody, gw)
    tag = uuid.uuid4().hex[:6]
    failing = f"{FAULT_MARKER} {tag}"
    after_failure = f"{tag}: the {BLOCKED_WORD} launch date"

    async def scenario():
        async with route.client("alice") as alice, route.client("carol") as carol, \
                Outside(prosody).client(route.account("bob")) as bob:
            warmup = f"before the failure {tag}"
            alice.send_chat(bob.jid, warmup)
            assert await bob.wait_message(warmup), "alice's first message did not arrive"
            alice.send_chat(bob.jid, failing)
            if mode == "open":
                assert await bob.wait_message(failing), "the read that failed was not relayed (fail mode open)"
                alice.send_chat(bob.jid, after_failure)
                assert await bob.wait_message(after_failure), (
                    f"alice's connection did not carry on uninspected after the failure: bob got {bob.bodies()}")
                assert alice.alive
            else:
                assert await alice.wait_for(lambda r: not alice.alive, timeout=10), (
                    "alice's connection stayed open after her session failed (fail mode closed)")
            await sentinel_after(carol, bob, "carol, after alice's session failed")
            return bob.bodies()
    bodies = run(scenario())
    if mode == "closed":
        assert failing not in bodies and after_failure not in bodies, bodies
    alice = route.bare("alice")
    failures = [e for e in gw.alerts() if e.get("imguard", {}).get("anomaly", {}).get("kind") == "session_error"]
    assert len(failures) == 1, failures
    [failure] = failures
    assert failure["imguard"]["context"]["protocol"] == "xmpp"
    # The alert names the connection (not the user: the session that knew her JID is what failed); it is alice's
    # connection, as the archive record of her first message on it says.
    [warmup] = archive_search(gw, "--text", f"before the failure {tag}", "--person", alice, count=1)
    assert failure["imguard"]["context"]["connection_id"] == warmup["connection_id"], (failure, warmup)
    assert failure["imguard"]["context"]["client_address"] == warmup["client_address"]
    assert "injected decoder fault" in failure["imguard"]["anomaly"]["detail"]
    assert failure["imguard"]["anomaly"].get("fail_mode") == ("open" if mode == "open" else None), failure
    # Relaying the rest uninspected is the serious case: the SOC must see it above the noise of low anomalies.
    assert failure["imguard"]["severity"] == ("high" if mode == "open" else "low"), failure
    # What crossed after the failure was not inspected: no decision on it, in the alert log or the archive.
    assert not [e for e in gw.alerts() if after_failure in json.dumps(e)]
    # (The archive is written in order: once carol's sentinel, sent after all of alice's messages, is in, theirs are.)
    assert archive_search(gw, "--person", route.bare("carol"), "--text", "sentinel", count=1)
    assert not archive_search(gw, "--text", after_failure)
    assert [r["text"] for r in archive_search(gw, "--text", tag, "--person", alice)] == [f"before the failure {tag}"]
    # imguard's log: the one failure (its line and its traceback), nothing else.
    errors = gw.errors_since(offset)
    failed = [line for line in errors if "session XmppSession failed in _failing_steps" in line]
    assert len(failed) == 1 and len(errors) == 2 and "Traceback" in errors[1], errors
    gw.check_alive()


def test_malformed_stanza_closes_the_stream_even_with_parse_open(prosody, parse_gateway):
    """A protocol violation the decoder recognises (broken XML) is not a session failure: eve's stream is closed
    with a `malformed_xml` anomaly whether xmpp:parse is open or closed, and nothing of it reaches bob."""
    gw = parse_gateway
    offset = gw.log_size()
    route = XmppRoute("imguard", STARTTLS, prosody, gw)
    tag = uuid.uuid4().hex[:6]

    async def scenario():
        async with route.client("carol") as carol, Outside(prosody).client(route.account("bob")) as bob:
            async with route.client("eve") as eve:
                eve.send_raw(f"<message to='{bob.jid}'><body>broken {tag}</bdy></message>")
                assert await eve.wait_for(lambda r: not eve.alive, timeout=10), "the broken stream was left open"
            await sentinel_after(carol, bob, "after eve's broken XML")
            return bob.bodies()
    bodies = run(scenario())
    assert not [b for b in bodies if tag in b and "sentinel" not in b], bodies
    kinds = [e["imguard"]["anomaly"]["kind"] for e in gw.alerts()
             if e.get("imguard", {}).get("anomaly") and e["imguard"]["context"].get("sender", "").startswith(
                 route.bare("eve"))]
    assert kinds == ["malformed_xml"], kinds
    no_errors(gw, offset)


# --- fail modes irc:timeout and irc:overload, with ngIRCd and DCC through the gateway's relay ------------------------

@pytest.fixture
def start_irc_gateway(irc_dir, ircd):  # noqa: F811 - irc_dir and ircd are the imported module fixtures
    """Start `imguard run` in front of `ircd` with the wiring rule, the slow signature, /metrics and `extra`."""
    started = []

    def start(name: str, *extra: str):
        directory = irc_dir / f"imguard-{name}-{uuid.uuid4().hex[:6]}"
        (metrics_port,) = free_ports(1)
        gw = IrcGateway.start(directory, ircd, extra=[*prepare(directory, slow_signature=True),
                                                      "--metrics-listen", f"127.0.0.1:{metrics_port}", *extra])
        gw.metrics_port = metrics_port
        started.append(gw)
        return gw
    yield start
    for gw in started:
        stop(gw)


def file_alerts(gw, digest: str) -> list[dict]:
    return [e for e in gw.alerts() if e.get("event", {}).get("dataset") == "imguard.file"
            and e.get("file", {}).get("hash", {}).get("sha256") == digest]


@pytest.mark.parametrize("way", ["outbound", "inbound"])
@pytest.mark.parametrize("mode", ["closed", "open"])
def test_irc_inspection_timeout_with_real_peers(ircd, start_irc_gateway, mode, way):  # noqa: F811
    """A file built to scan slowly (seconds, under the slow signature) sent by DCC through the relay, inside out
    and outside in, with --inspect-timeout 1: irc:timeout=closed keeps it from the receiver, tells the inside
    person, quarantines it and alerts; open relays it byte-identical and alerts. Both alerts say the fail mode and
    the direction, the archive has the decision, and the IRC sessions carry on."""
    gw = start_irc_gateway(f"timeout-{mode}", "--inspect-timeout", "1", "--fail-mode", f"irc:timeout={mode}")
    route = IrcRoute("imguard", False, ircd, gw)
    name = f"slow-{uuid.uuid4().hex[:6]}.bin"
    with Chat(route) as chat:
        sender, receiver = across(chat, way)
        inside = receiver if way == "inbound" else sender
        t = chat.offer_file(sender, receiver, name, SLOW_FILE)
        assert chat.pump(lambda: t.done, 30), f"the transfer did not end: {len(t.received)} bytes\n{gw.logs()}"
        assert t.offer is not None and t.offer["port"] in gw.dcc_ports, f"not sent to the relay: {t.offer}"
        if mode == "closed":
            assert bytes(t.received) == b"", f"{len(t.received)} bytes of the timed-out file arrived"
            assert chat.pump(lambda: any(name in n for n in inside.imguard_notices()), 10), inside.notices
        else:
            assert bytes(t.received) == SLOW_FILE, f"{len(t.received)} bytes arrived, not the file"
        chat.sentinel(sender, receiver, "after the slow file")
    decided = [e for e in file_alerts(gw, sha256(SLOW_FILE)) if fail_mode_of(e)]
    assert len(decided) == 1, decided
    [alert] = decided
    assert fail_mode_of(alert) == {"situation": "timeout", "mode": mode}
    assert alert["event"]["action"] == ("block" if mode == "closed" else "alert"), alert["event"]
    assert alert["event"]["kind"] == "alert"
    assert alert["file"]["name"] == name and alert["imguard"]["context"]["transfer_mechanism"] == "dcc"
    assert_parties(alert, way, sender, receiver)
    findings = alert["imguard"]["report"]["findings"]
    assert [(f["kind"], f["data"].get("reason")) for f in findings] == [("unscannable", "timeout")], findings
    rows = [r for r in archive_search(gw, "--sha256", sha256(SLOW_FILE), count=1)
            if r["action"] == alert["event"]["action"]]
    assert [(r["direction"], r["file_name"]) for r in rows] == [(way, name)], rows
    quarantined = gw.data_dir / "quarantine" / sha256(SLOW_FILE)[:2] / sha256(SLOW_FILE)
    if mode == "closed":
        assert_quarantined(gw, SLOW_FILE, name, "block", alert["source"]["user"]["name"], receiver.nick)
    else:
        assert not quarantined.exists(), "a file relayed by fail mode open was quarantined"


def test_irc_overload_with_real_peers(ircd, start_irc_gateway):  # noqa: F811
    """--inspect-queue 1 and two files at once by DCC through the relay: the slow one holds the only slot, the
    second (harmless) is not scanned: irc:overload=closed blocks it with an alert that says so, alice is told, bob
    gets nothing of it; the slow one arrives after its scan. /metrics counts the two file decisions."""
    gw = start_irc_gateway("overload", "--inspect-queue", "1", "--fail-mode", "irc:overload=closed")
    route = IrcRoute("imguard", False, ircd, gw)
    second = b"harmless second file " + uuid.uuid4().hex.encode() + b"\\n"
    slow_name, second_name = f"slow-{uuid.uuid4().hex[:6]}.bin", f"second-{uuid.uuid4().hex[:6]}.txt"
    before = scrape(gw.metrics_port)
    with Chat(route) as chat:
        alice, bob = chat.person("alice"), chat.person("bob")
        slow = chat.offer_file(alice, bob, slow_name, SLOW_FILE)
        # The slow file is in inspection once the relay has it all (it acknowledges every byte to alice).
        assert chat.pump(lambda: slow.acked >= len(SLOW_FILE), 15), f"the slow file was not taken: {slow.acked}"
        t = chat.offer_file(alice, bob, second_name, second)
        assert chat.pump(lambda: t.done, 20), f"the second transfer did not end\\n{gw.logs()}"
        assert bytes(t.received) == b"", "the file that found the queue full reached bob"
        assert chat.pump(lambda: any(second_name in n for n in alice.imguard_notices()), 10), alice.notices
        assert chat.pump(lambda: slow.done, 30), f"the slow file did not arrive\\n{gw.logs()}"
        assert bytes(slow.received) == SLOW_FILE
        chat.sentinel(alice, bob, "after the overload")
    [alert] = file_alerts(gw, sha256(second))
    assert fail_mode_of(alert) == {"situation": "overload", "mode": "closed"}
    assert alert["event"]["action"] == "block" and alert["file"]["name"] == second_name
    assert_quarantined(gw, second, second_name, "block", alice.nick, bob.nick)
    [row] = archive_search(gw, "--sha256", sha256(second), count=1)
    assert (row["file_name"], row["action"], row["mechanism"]) == (second_name, "block", "dcc"), row
    [slow_alert] = file_alerts(gw, sha256(SLOW_FILE))
    assert slow_alert["event"]["action"] == "allow" and not fail_mode_of(slow_alert)
    # /metrics: two files decided (the notice to alice about the blocked one is not a third), the unscannable-file
    # rule's block; four IRC connections (alice, bob, and bob's two DCC connections to the relay).
    after = scrape(gw.metrics_port)
    assert moved_series(before, after, "imguard_files_total") == {(("action", "allow"),): 1, (("action", "block"),): 1}
    assert {labels: n for labels, n in moved_series(before, after, "imguard_decisions_total").items()
            if ("kind", "file") in labels} == {
        (("action", "allow"), ("kind", "file"), ("rule", "")): 1,
        (("action", "block"), ("kind", "file"), ("rule", "unscannable-file")): 1}
    assert moved_series(before, after, "imguard_connections_total") == {(("protocol", "irc"),): 4}
    assert moved(before, after, "imguard_file_bytes_total") == len(SLOW_FILE) + len(second)
    assert moved(before, after, "imguard_file_size_bytes_count") == 2
