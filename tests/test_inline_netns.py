"""imguard inline for real: a client network, a gateway and a server network as three network namespaces.

    client 10.231.1.2  ->  gateway (ip_forward, chat ports redirected to `imguard run --mode transparent@8080`,
                           run with every capability dropped)  ->  server 10.231.2.2 (Prosody, a TCP echo server)

The client talks to the server by its real address, as on a real network; the redirect is the very rule file
admins deploy (deploy/nftables/imguard.nft, or deploy/iptables/imguard-iptables.sh: every test runs with both).
Everything is made by the fixture and removed at its end, even after a failure. Needs root; skipped with the
reason when the kernel refuses namespaces or NAT.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.peers import netns
from tests.peers.netns import CLIENT_IP, GW_CLIENT_IP, SERVER_IP, NetnsProsody, NetnsUnavailable, Topology

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-" + b"ANTIVIRUS-TEST-FILE!$H+H*"
CHAT_PORTS = [5222, 5223, 6667, 6697]
LISTEN_PORT = 8080
FW_EXCLUDED_IP = "10.231.2.3"       # excluded in the redirect rules: never reaches imguard
APP_EXCLUDED_IP = "10.231.2.4"      # redirected, but excluded by imguard's --exclude: relayed untouched
ECHO_PORT = 7000                    # not a chat port: routed, not redirected


class Inline:
    def __init__(self, net: Topology, directory: Path, prosody: NetnsProsody, process, backend: str):
        self.net, self.directory, self.prosody, self.process, self.backend = net, directory, prosody, process, backend

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_file(self) -> Path:
        return self.directory / "imguard.log"

    @property
    def ca_file(self) -> Path:
        return self.directory / "imguard-ca.pem"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def alerts(self) -> list[dict]:
        path = self.data_dir / "alerts.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(errors="replace").splitlines() if line.strip()]

    def wait_alert(self, predicate, timeout: float = 10.0) -> dict | None:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.alerts():
                if predicate(event):
                    return event
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def xmpp(self, host: str = SERVER_IP, port: int = 5222, ca_file: Path | None = None, **extra) -> dict:
        spec = {"host": host, "port": port, "mode": extra.pop("mode", "starttls"),
                "ca_file": str(ca_file or self.ca_file),
                "alice_pw": self.prosody.accounts["alice"], "bob_pw": self.prosody.accounts["bob"], **extra}
        return self.net.python("client", ["xmpp-scenario", json.dumps(spec)])

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"imguard run died ({self.process.returncode}):\n{self.log()[-4000:]}")


def _prepare_dirs(directory: Path) -> None:
    """The rules imguard runs with: the bundled ones plus the test keyword rule."""
    rules = directory / "rules"
    rules.mkdir()
    for source in (ROOT / "rules", ROOT / "tests" / "data" / "rules"):
        for path in sorted(source.glob("*.yaml")):
            shutil.copy(path, rules / path.name)
    data = directory / "data"
    data.mkdir()


def _wait_started(net: Topology, process, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while b"imguard gateway running" not in (log.read_bytes() if log.exists() else b""):
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"imguard run did not start ({process.poll()}):\n"
                                 f"{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="module", params=["nft", "iptables"])
def inline(request):
    try:
        netns.preflight()
    except NetnsUnavailable as e:
        pytest.skip(f"inline test needs network namespaces with NAT: {e}")
    directory = Path(tempfile.mkdtemp(prefix=f"imguard-netns-{request.param}-"))
    net = Topology.create()
    prosody = process = None
    failed_before = request.session.testsfailed
    try:
        for ip in (FW_EXCLUDED_IP, APP_EXCLUDED_IP):
            net.add_address("server", ip)
        prosody = NetnsProsody.start(net, directory / "prosody", ips=(SERVER_IP, FW_EXCLUDED_IP, APP_EXCLUDED_IP))
        echo = net.popen("server", [PYTHON, "-m", "tests.peers.netns", "echo-server", ECHO_PORT],
                         directory / "echo.log")
        net.redirect(request.param, CHAT_PORTS, [LISTEN_PORT], exclude=[FW_EXCLUDED_IP])
        _prepare_dirs(directory)
        log = directory / "imguard.log"
        process = net.popen("gateway", [
            PYTHON, "-m", "imguard", "run",
            "--mode", f"transparent@{LISTEN_PORT}", "--listen-host", GW_CLIENT_IP,
            "--upstream-ca", prosody.ca_file, "--data-dir", directory / "data",
            "--rules", directory / "rules", "--signatures", ROOT / "signatures",
            "--exclude", APP_EXCLUDED_IP, "--reload-interval", "0"], log, no_capabilities=True)
        _wait_started(net, process, log)
        export = subprocess_run([PYTHON, "-m", "imguard", "ca", "--data-dir", directory / "data",
                                 "--export", directory / "imguard-ca.pem"])
        assert export.returncode == 0, export.stderr
        deadline = time.monotonic() + 10
        while not net.run("server", ["ss", "-Hltn", f"sport = :{ECHO_PORT}"], check=False).stdout.strip():
            assert echo.poll() is None and time.monotonic() < deadline, (directory / "echo.log").read_text()
            time.sleep(0.05)
        yield Inline(net, directory, prosody, process, request.param)
        assert process.poll() is None, f"imguard run died:\n{log.read_text(errors='replace')[-4000:]}"
        errors = [line for line in log.read_text(errors="replace").splitlines()
                  if "Traceback" in line or " ERROR " in line or " CRITICAL " in line]
        assert not errors, "imguard logged errors:\n" + "\n".join(errors)
    finally:
        from tests.peers.prosody import stop_process
        if process is not None:
            stop_process(process)
        if prosody is not None:
            prosody.stop()
        net.destroy()
        leftover = [ns for ns in net.names.values() if ns in netns._run(["ip", "netns", "list"]).stdout]
        assert not leftover, f"namespaces left behind: {leftover}"
        if request.session.testsfailed == failed_before and os.environ.get("IMGUARD_E2E_KEEP") != "1":
            shutil.rmtree(directory, ignore_errors=True)


def subprocess_run(args):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)


# --- the tests ---------------------------------------------------------------------------------------------

def test_redirect_rules_are_loaded_in_the_gateway_namespace(inline):
    rules = inline.net.ruleset()
    assert str(LISTEN_PORT) in rules and inline.net.lan_if in rules, rules
    assert ("redirect" in rules) if inline.backend == "nft" else ("REDIRECT" in rules), rules


def test_imguard_runs_without_any_capability(inline):
    """Transparent mode needs no capability: SO_ORIGINAL_DST is readable without CAP_NET_ADMIN, port 8080 is
    not a low port. (imguard ran with an empty bounding set from the start, so everything above passed so.)"""
    status = Path(f"/proc/{inline.process.pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    for name in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
        assert int(fields[name].strip(), 16) == 0, f"{name}: {fields[name].strip()}"
    assert "python" in Path(f"/proc/{inline.process.pid}/cmdline").read_text(), "not imguard's own process"


def test_chat_message_passes_through_the_transparent_gateway(inline):
    seen = inline.xmpp()
    assert seen["message_arrived"], seen
    assert "imguard" in seen["issuer"] and "test peers" not in seen["issuer"], (
        f"the client's TLS was not intercepted by imguard: {seen['issuer']}")
    event = inline.wait_alert(lambda e: e.get("event", {}).get("dataset") == "imguard.message"
                              and e.get("imguard", {}).get("message", {}).get("text") == seen["body"])
    assert event, f"imguard recorded no message event for {seen['body']!r}"
    # The original destination came from conntrack (SO_ORIGINAL_DST): the real server, the real client.
    assert event["destination"]["ip"] == SERVER_IP and event["destination"]["port"] == 5222, event["destination"]
    assert event["source"]["ip"] == CLIENT_IP, event["source"]
    inline.check_alive()


def test_direct_tls_xmpp_is_intercepted_too(inline):
    """XEP-0368 direct TLS on 5223: TLS from the first byte, terminated by imguard with its CA."""
    seen = inline.xmpp(port=5223, mode="directtls")
    assert seen["message_arrived"], seen
    assert "imguard" in seen["issuer"] and "test peers" not in seen["issuer"], seen["issuer"]
    event = inline.wait_alert(lambda e: e.get("imguard", {}).get("message", {}).get("text") == seen["body"])
    assert event and event["destination"]["port"] == 5223, event and event.get("destination")


def test_eicar_by_ibb_is_stopped_and_the_alert_names_it(inline):
    name = f"eicar-inline-{os.urandom(3).hex()}.com"
    seen = inline.xmpp(file_b64=base64.b64encode(EICAR).decode(), file_name=name)
    assert seen["message_arrived"], seen
    assert seen["received_sha256"] != hashlib.sha256(EICAR).hexdigest(), f"EICAR reached bob: {seen}"
    assert seen["notice"], f"alice got no notice naming {name}: {seen}"
    assert seen["after_arrived"], "the session did not carry on after the blocked file"
    alert = inline.wait_alert(lambda e: e.get("file", {}).get("name") == name
                              and e["event"].get("action") in ("block", "quarantine"))
    assert alert, f"no block alert naming {name}"
    assert alert["file"]["hash"]["sha256"] == hashlib.sha256(EICAR).hexdigest()
    assert alert["destination"]["ip"] == SERVER_IP and alert.get("rule", {}).get("id"), alert


def test_traffic_that_is_not_chat_is_routed_untouched(inline):
    """A TCP echo on port 7000 is forwarded by the kernel, not proxied: the server sees the client's own
    address and port, and every byte comes back identical."""
    seen = inline.net.python("client", ["echo-client", SERVER_IP, ECHO_PORT, 256 * 1024])
    assert seen["peer"] == seen["local"] and seen["peer"].startswith(CLIENT_IP + ":"), seen
    assert seen["received"] == 256 * 1024 and seen["received_sha256"] == seen["sent_sha256"], seen
    assert f":{ECHO_PORT}" not in inline.log(), "imguard saw the non-chat connection"


def test_direct_connection_to_the_listener_is_dropped(inline):
    """Only redirected connections reach imguard's port (the anti-loop rule of the deployed rule set)."""
    seen = inline.net.python("client", ["connect", GW_CLIENT_IP, LISTEN_PORT, "2"])
    assert not seen["connected"], seen
    assert "self_connect" not in inline.log()


def test_destination_excluded_in_the_redirect_rules_is_not_intercepted(inline):
    seen = inline.xmpp(host=FW_EXCLUDED_IP, ca_file=inline.prosody.ca_file)
    assert seen["message_arrived"], seen
    assert "imguard test peers CA" in seen["issuer"], f"the excluded server was intercepted: {seen['issuer']}"


def test_destination_excluded_by_imguard_setting_is_relayed_untouched(inline):
    seen = inline.xmpp(host=APP_EXCLUDED_IP, ca_file=inline.prosody.ca_file)
    assert seen["message_arrived"], seen
    assert "imguard test peers CA" in seen["issuer"], f"--exclude {APP_EXCLUDED_IP} was intercepted: {seen['issuer']}"
    assert f"{APP_EXCLUDED_IP}:5222: excluded from interception" in inline.log()
    assert not inline.wait_alert(lambda e: e.get("imguard", {}).get("message", {}).get("text") == seen["body"],
                                 timeout=0.5), "imguard inspected a message to an excluded destination"


def _memory_kib(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


def _flood(inline, wait_greeting: bool, size: int = 8 * 1024 * 1024, connections: int = 100
           ) -> tuple[dict, float, float]:
    before = _memory_kib(inline.process.pid)
    outcome = inline.net.python("client", ["flood", SERVER_IP, 5222, connections, size, 5]
                                + (["--wait-greeting"] if wait_greeting else []), timeout=120)
    after = _memory_kib(inline.process.pid)
    growth_mib = (after["VmHWM"] - before["VmRSS"]) / 1024
    offered_mib = connections * size / 2**20
    print(f"flood (wait_greeting={wait_greeting}): {outcome}; RSS {before['VmRSS'] // 1024} MiB -> peak "
          f"{after['VmHWM'] // 1024} MiB (+{growth_mib:.0f} MiB for {offered_mib:.0f} MiB offered), "
          f"now {after['VmRSS'] // 1024} MiB")
    if size > 256 * 1024:
        assert outcome.get("closed", 0) == connections, f"not every oversized stanza was refused: {outcome}"
    inline.check_alive()
    return outcome, growth_mib, offered_mib


def test_memory_stays_bounded_under_a_flood_of_oversized_stanzas(inline):
    """100 established XMPP sessions at once each push an 8 MiB stanza (32x the stanza limit): every one is closed
    at the limit, imguard's peak memory grows by a small fraction of the 800 MiB offered (what it holds per
    connection is bounded), and chat carries on afterwards."""
    _, growth_mib, offered_mib = _flood(inline, wait_greeting=True)
    assert growth_mib < offered_mib / 4, f"peak memory grew by {growth_mib:.0f} MiB for {offered_mib:.0f} MiB offered"
    assert inline.xmpp()["message_arrived"], "chat did not carry on after the flood"


def test_memory_stays_bounded_when_the_flood_comes_before_the_server_connection(inline):
    """The same flood sent at once, while imguard is still opening the server connections (mitmproxy reads and
    queues without backpressure meanwhile): still bounded per connection."""
    _, growth_mib, offered_mib = _flood(inline, wait_greeting=False)
    assert growth_mib < offered_mib / 4, f"peak memory grew by {growth_mib:.0f} MiB for {offered_mib:.0f} MiB offered"
