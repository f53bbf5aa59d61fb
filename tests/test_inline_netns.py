"""imguard inline for real: a client network, a gateway and a server network as three network namespaces.

    client 10.231.1.2  ->  gateway 10.231.1.1 (ip_forward, the shipped redirect rules, imguard started with the
                           shipped unit's command line, every capability dropped)  ->  server 10.231.2.2

As shipped is as tested: the redirect is the very rule file admins deploy (deploy/nftables/imguard.nft, or
deploy/iptables/imguard-iptables.sh: every test runs with both) with only its site parameters set (LAN_IF,
IMGUARD_PORTS, EXCLUDE); imguard runs the ExecStart line of deploy/systemd/imguard@.service with its
environment file deploy/imguard.env.example (and its config file, if the unit names one), with only %i, the
install paths and the per-site values substituted. So the relays are whatever transparent mode turns on by itself.

Every protocol family crosses through them, the client talking to the server by its real address, as on a real
network: XMPP (Prosody) with files by IBB, SOCKS5 bytestream (Prosody's proxy65 on 7777: offers rewritten to the
gateway's relay) and HTTPS upload (mod_http_file_share on 5281); IRC (ngIRCd) with DCC through the gateway's DCC
relay, also with one party outside (its sockets in the server's namespace) both ways round; Matrix over HTTPS
(Synapse on 443); SIP MESSAGE (Kamailio) over TCP through the transparent listener and over UDP through the
worker's reverse:udp listener that SIP_UDP_SERVER is redirected to (UDP has no transparent mode); a legacy
protocol, MSNP, with its in-band MSNSLP file (the scripted switchboard of tests/test_legacy_gateway.py). For each,
EICAR is blocked, a clean file arrives byte-identical, and a sentinel sent after the block arrives.

Everything is made by the fixture and removed at its end, even after a failure. Needs root; skipped with the
reason when the kernel refuses namespaces or NAT.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from imguard.gateway.master import AUTO_BYTESTREAM_PORT
from imguard.gateway.settings import GatewaySettings
from imguard.protocols import registry
from tests.peers import netns
from tests.peers.netns import (CLIENT_IP, GW_CLIENT_IP, SERVER_IP, NetnsNgircd, NetnsProsody, NetnsUnavailable,
                               Topology)

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
UNIT = ROOT / "deploy" / "systemd" / "imguard@.service"
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-" + b"ANTIVIRUS-TEST-FILE!$H+H*"
CLEAN = b"quarterly numbers, nothing secret\n" * 400 + bytes(range(256)) * 8   # binary tail, 15.6 kB
LISTEN_PORT = 8080                  # the unit's %i, and the one worker of the shipped numgen map
FW_EXCLUDED_IP = "10.231.2.3"       # excluded in the redirect rules: never reaches imguard
APP_EXCLUDED_IP = "10.231.2.4"      # redirected, but excluded by imguard's --exclude: relayed untouched
ECHO_PORT = 7000                    # not a chat port: routed, not redirected
MSN_PORT = 1863                     # MSNP, in the default port map
DCC_RANGE = range(20000, 20100)     # the default --dcc-relay-ports
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

    def mark(self) -> int:
        """For wait_alert(since=...): only the events logged from now on."""
        return len(self.alerts())

    def wait_alert(self, predicate, timeout: float = 10.0, since: int = 0) -> dict | None:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.alerts()[since:]:
                if predicate(event):
                    return event
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def sha_alert(self, data: bytes, actions: tuple[str, ...], since: int) -> dict | None:
        """The file event for `data` with one of `actions`, logged since `since` (mark())."""
        sha = hashlib.sha256(data).hexdigest()
        return self.wait_alert(lambda e: e.get("file", {}).get("hash", {}).get("sha256") == sha
                               and e.get("event", {}).get("action") in actions, since=since)

    def xmpp(self, host: str = SERVER_IP, port: int = 5222, ca_file: Path | None = None, **extra) -> dict:
        spec = {"host": host, "port": port, "mode": extra.pop("mode", "starttls"),
                "ca_file": str(ca_file or self.ca_file),
                "alice_pw": self.prosody.accounts["alice"], "bob_pw": self.prosody.accounts["bob"], **extra}
        return self.net.python("client", ["xmpp-scenario", json.dumps(spec)])

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"imguard run died ({self.process.returncode}):\n{self.log()[-4000:]}")


def _prepare_etc(etc: Path) -> None:
    """The temp /etc/imguard: the bundled rules plus the test keyword rule, the bundled signatures."""
    rules = etc / "rules"
    rules.mkdir(parents=True)
    for source in (ROOT / "rules", ROOT / "tests" / "data" / "rules"):
        for path in sorted(source.glob("*.yaml")):
            shutil.copy(path, rules / path.name)
    shutil.copytree(ROOT / "signatures", etc / "signatures")


def _unit_lines(text: str) -> list[tuple[str, str]]:
    """(key, value) of a systemd unit's lines, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [(k.strip(), v.strip()) for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith(("#", ";", "[")) and "=" in line
            for k, _, v in [line.partition("=")]]


def _site_args(words: list[str], site: dict[str, str]) -> list[str]:
    """`words` with the value after each --OPTION named in `site` replaced by the site's value."""
    out = list(words)
    for i, word in enumerate(words[:-1]):
        if word in site:
            out[i + 1] = site[word]
    return out


def _site_config(text: str, site: dict[str, object]) -> str:
    """The shipped example config (YAML) with its per-site keys set: each `key:` line (commented or not) replaced,
    a missing key appended."""
    for key, value in site.items():
        line = f"{key}: {json.dumps(value)}"
        text, n = re.subn(rf"^#?\s*{key}:.*$", line, text, count=1, flags=re.M)
        if n == 0:
            text += f"\n{line}\n"
    return text


def unit_commands(directory: Path, upstream_ca: Path) -> tuple[list[list[str]], list[str], dict[str, str]]:
    """(ExecStartPre commands, the ExecStart command, its environment) of deploy/systemd/imguard@.service as a
    worker on LISTEN_PORT would run them here: %i, the install paths (/opt/imguard/venv -> .venv, /var/lib/imguard
    and /etc/imguard -> temp folders) and the per-site values (the gateway's address, the exclusion, the test
    servers' CA) substituted, nothing else. $IMGUARD_ARGS comes from the environment file the unit reads, i.e.
    deploy/imguard.env.example copied to the temp /etc/imguard; a config file the unit names is the shipped example
    of the same name in deploy/, copied there with its per-site keys set."""
    etc, data = directory / "etc", directory / "data"
    # This worker's own file (the unit's imguard@%i.env): SIP over UDP to the one SIP server, as documented in
    # deploy/imguard.env.example (UDP has no transparent mode).
    (etc / f"imguard@{LISTEN_PORT}.env").write_text(
        f"IMGUARD_WORKER_ARGS=--mode reverse:udp://{SERVER_IP}:5060@5060\n")
    paths = {"%i": str(LISTEN_PORT), "/opt/imguard/venv": str(ROOT / ".venv"), "/var/lib/imguard": str(data),
             "/etc/imguard": str(etc)}

    def subst(value: str) -> str:
        for old, new in paths.items():
            value = value.replace(old, new)
        return value
    lines = _unit_lines(UNIT.read_text())
    env: dict[str, str] = {}
    for key, value in lines:
        if key == "Environment":
            name, _, val = value.partition("=")
            env[name] = subst(val)
        elif key == "EnvironmentFile":
            path = Path(subst(value.lstrip("-")))
            shipped = ROOT / "deploy" / (path.name + ".example")
            if shipped.exists():
                shutil.copy(shipped, path)
            if path.exists():
                for line in path.read_text().splitlines():
                    if line.strip() and not line.startswith("#") and "=" in line:
                        name, _, val = line.partition("=")
                        env[name.strip()] = val.strip()
    site = {"--listen-host": GW_CLIENT_IP, "--exclude": APP_EXCLUDED_IP, "--upstream-ca": str(upstream_ca)}
    if "IMGUARD_ARGS" in env:
        env["IMGUARD_ARGS"] = shlex.join(_site_args(shlex.split(env["IMGUARD_ARGS"]), site))

    def command(value: str) -> list[str]:
        words: list[str] = []
        for word in shlex.split(subst(value)):
            if re.fullmatch(r"\$\w+", word):          # $VAR: split into words, as systemd does
                words += shlex.split(env.get(word[1:], ""))
            else:
                words.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
        if "--config" in words:
            config = Path(words[words.index("--config") + 1])
            config.write_text(_site_config(subst((ROOT / "deploy" / config.name).read_text()), {
                "listen-host": GW_CLIENT_IP, "exclude": [APP_EXCLUDED_IP], "upstream-ca": str(upstream_ca)}))
        return words
    pre = [command(v) for k, v in lines if k == "ExecStartPre"]
    [start] = [command(v) for k, v in lines if k == "ExecStart"]
    if "--config" not in start:     # no config file: the site values not in the environment file go on the line
        start += [w for opt, value in site.items() if opt not in start for w in (opt, value)]
    return pre, start, {k: v for k, v in env.items() if k != "IMGUARD_ARGS"}


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
    prosody = ircd = kamailio = synapse = process = msn = None
    failed_before = request.session.testsfailed
    try:
        for ip in (FW_EXCLUDED_IP, APP_EXCLUDED_IP):
            net.add_address("server", ip)
        prosody = NetnsProsody.start(net, directory / "prosody", ips=(SERVER_IP, FW_EXCLUDED_IP, APP_EXCLUDED_IP))
        ircd = NetnsNgircd.start(net, directory / "ngircd")
        kamailio = netns.start_kamailio(net, directory / "kamailio")
        synapse = netns.start_synapse(net, directory / "synapse")
        echo = net.popen("server", [PYTHON, "-m", "tests.peers.netns", "echo-server", ECHO_PORT],
                         directory / "echo.log")
        (directory / "msn-parts.json").write_text(json.dumps(netns.msnslp_parts(EICAR, CLEAN)))
        msn_spec = {"host": SERVER_IP, "port": MSN_PORT, "parts": str(directory / "msn-parts.json"),
                    "received": str(directory / "msn-received.bin")}
        msn = net.popen("server", [PYTHON, "-m", "tests.peers.netns", "msn-server", json.dumps(msn_spec)],
                        directory / "msn.log")
        net.redirect(request.param, imguard_ports=[LISTEN_PORT], exclude=[FW_EXCLUDED_IP],    # shipped port lists
                     sip_udp_server=SERVER_IP)
        (directory / "etc").mkdir()
        _prepare_etc(directory / "etc")
        (directory / "data").mkdir()
        upstream_ca = directory / "upstream-ca.pem"       # the site's private CA(s): the test servers'
        upstream_ca.write_text(prosody.ca_file.read_text() + synapse.ca_file.read_text())
        pre, command, env = unit_commands(directory, upstream_ca)
        for step in pre:
            done = net.run("gateway", step, check=False, env={**os.environ, **env})
            assert done.returncode == 0, f"ExecStartPre {step} failed: {done.stderr}"
        log = directory / "imguard.log"
        process = net.popen("gateway", command, log, env=env, no_capabilities=True)
        _wait_started(net, process, log)
        export = subprocess_run([PYTHON, "-m", "imguard", "ca", "--data-dir", directory / "data",
                                 "--export", directory / "imguard-ca.pem"])
        assert export.returncode == 0, export.stderr
        deadline = time.monotonic() + 10
        while not all(net.run("server", ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout.strip()
                      for port in (ECHO_PORT, MSN_PORT)):
            assert echo.poll() is None and msn.poll() is None and time.monotonic() < deadline, (
                (directory / "echo.log").read_text() + (directory / "msn.log").read_text())
            time.sleep(0.05)
        inline = Inline(net, directory, prosody, process, request.param)
        inline.ircd, inline.kamailio, inline.synapse = ircd, kamailio, synapse
        inline.command, inline.msn_spec = command, msn_spec
        yield inline
        assert process.poll() is None, f"imguard run died:\n{log.read_text(errors='replace')[-4000:]}"
        errors = [line for line in log.read_text(errors="replace").splitlines()
                  if "Traceback" in line or " ERROR " in line or " CRITICAL " in line]
        assert not errors, "imguard logged errors:\n" + "\n".join(errors)
    finally:
        from tests.peers.prosody import stop_process
        for running in (process, msn):
            if running is not None:
                stop_process(running)
        for peer in (prosody, ircd, kamailio, synapse):
            if peer is not None:
                peer.stop()
        net.destroy()
        leftover = [ns for ns in net.names.values() if ns in netns._run(["ip", "netns", "list"]).stdout]
        assert not leftover, f"namespaces left behind: {leftover}"
        if request.session.testsfailed == failed_before and os.environ.get("IMGUARD_E2E_KEEP") != "1":
            shutil.rmtree(directory, ignore_errors=True)


def subprocess_run(args):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)


# --- the shipped files ------------------------------------------------------------------------------------

def test_shipped_redirect_ports_are_imguards_defaults():
    """The port lists of deploy/nftables/imguard.nft and deploy/iptables/imguard-iptables.sh are the code's: every
    port of the default port map (registry.default_ports()), the default --http-ports, and the relays transparent
    mode opens by default (the bytestream relay's socks5 port, the DCC relay range). No root needed."""
    defaults = GatewaySettings()
    expected = {"CHAT_PORTS": {int(item.partition("=")[0]) for item in registry.default_ports()},
                "HTTP_PORTS": {int(p) for p in defaults.http_ports},
                "RELAY_PORTS": {AUTO_BYTESTREAM_PORT, *range(int(defaults.dcc_relay_ports.split("-")[0]),
                                                             int(defaults.dcc_relay_ports.split("-")[1]) + 1)}}
    assert defaults.bytestream_relay == "auto" and defaults.dcc_relay == "auto"
    for backend, lists in netns.shipped_lists().items():
        for name, ports in expected.items():
            assert lists.get(name) == ports, (f"{backend}: {name} {sorted(lists.get(name, ()))} is not imguard's "
                                              f"default {sorted(ports)}")
    assert DCC_RANGE == range(min(expected["RELAY_PORTS"] - {AUTO_BYTESTREAM_PORT}),
                              max(expected["RELAY_PORTS"]) + 1)


def _relays(**settings):
    from mitmproxy.proxy import mode_specs
    from imguard.gateway.master import side_relays
    s = GatewaySettings(**settings)
    return side_relays(s, [mode_specs.ProxyMode.parse(m) for m in s.mode])


def test_transparent_mode_turns_the_side_channel_relays_on_by_default():
    """'auto' (the default): in transparent mode both relays at --listen-host, the bytestream relay's socks5
    listener opened by itself (unless --mode has one on its port); elsewhere off, as before. ''/'none' turn a relay
    off; a listen host that is not one address cannot be announced. No root needed."""
    from imguard.gateway.master import GatewayError
    gw = "10.0.0.1"
    assert _relays(mode=["transparent@8080"], listen_host=gw) == ((gw, AUTO_BYTESTREAM_PORT), gw, ["socks5@1080"])
    assert _relays(mode=["transparent@8080", "socks5@1080"], listen_host=gw) == ((gw, 1080), gw, [])
    assert _relays(mode=["transparent@8080"], listen_host=gw, bytestream_relay=f"{gw}:1081") == (
        (gw, 1081), gw, ["socks5@1081"])                    # a second worker's own port
    assert _relays(mode=["transparent@8080"], listen_host=gw, bytestream_relay="none", dcc_relay="") == (None, "", [])
    assert _relays(mode=["regular@8080", "socks5@1080"], listen_host=gw) == (None, "", [])
    assert _relays(mode=["socks5@1080"], bytestream_relay="127.0.0.1:1080", dcc_relay="127.0.0.1") == (
        ("127.0.0.1", 1080), "127.0.0.1", [])
    for host in ("", "0.0.0.0"):
        with pytest.raises(GatewayError, match="listen-host"):
            _relays(mode=["transparent@8080"], listen_host=host)
    with pytest.raises(GatewayError, match="needs a socks5 listener"):
        _relays(mode=["regular@8080"], bytestream_relay="127.0.0.1:1080")


def test_the_gateway_runs_the_units_command_line(inline):
    """imguard was started with the shipped unit's ExecStart (only %i, the install paths and the site values
    substituted): transparent on %i, and the relays transparent mode turns on by itself, listening at the
    gateway's address: the bytestream relay's socks5 port and the whole DCC range."""
    cmdline = Path(f"/proc/{inline.process.pid}/cmdline").read_bytes().split(b"\0")
    assert f"transparent@{LISTEN_PORT}".encode() in cmdline, cmdline
    assert not any(b"relay" in word for word in cmdline), f"the unit sets a relay by itself: {cmdline}"
    listening = inline.net.run("gateway", ["ss", "-Hltn"]).stdout
    ports = {int(m.group(2)) for m in re.finditer(r"(\S+):(\d+)\s", listening) if m.group(1) == GW_CLIENT_IP}
    assert {LISTEN_PORT, AUTO_BYTESTREAM_PORT} | set(DCC_RANGE) <= ports, sorted(ports)
    assert f"bytestreams SOCKS5 streamhosts rewritten to {GW_CLIENT_IP}:{AUTO_BYTESTREAM_PORT}" in inline.log()
    assert f"dcc relay   IRC DCC offers rewritten to {GW_CLIENT_IP}" in inline.log()


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


# --- every protocol family through the shipped rules ---------------------------------------------------------

def _file_spec(mechanism: str, data: bytes, blocked: bool) -> dict:
    name = f"{'eicar' if blocked else 'numbers'}-{mechanism}-{os.urandom(3).hex()}.{'com' if blocked else 'bin'}"
    return {"mechanism": mechanism, "name": name, "data_b64": base64.b64encode(data).decode(), "blocked": blocked}


@pytest.mark.parametrize("mechanism", ["ibb", "socks5", "upload"])
def test_xmpp_files_eicar_blocked_clean_file_arrives(inline, mechanism):
    """XMPP files by IBB (on the chat connection), SOCKS5 bytestream (Prosody's proxy65 on 7777: the offer bob gets
    names the gateway's relay, which transparent mode opened by itself) and HTTPS upload (mod_http_file_share on
    5281, a redirected HTTP port): EICAR never reaches bob, the clean file arrives byte-identical, and a message
    sent after each arrives."""
    files = [_file_spec(mechanism, EICAR, True), _file_spec(mechanism, CLEAN, False)]
    since = inline.mark()
    seen = inline.xmpp(files=files)
    assert seen["message_arrived"], seen
    blocked, clean = seen["files"]
    assert blocked["received_sha256"] != blocked["sent_sha256"] and blocked["received_len"] < len(EICAR), blocked
    assert blocked["after_arrived"] and clean["after_arrived"], seen
    assert clean["received_sha256"] == clean["sent_sha256"] and not clean["sender_error"], clean
    if mechanism == "socks5":
        for transfer in (blocked, clean):
            assert [tuple(h) for h in transfer["streamhosts"]][-1:] == [(GW_CLIENT_IP, AUTO_BYTESTREAM_PORT)], (
                f"the offer bob got does not name the gateway's relay: {transfer['streamhosts']}")
    if mechanism == "upload":
        assert blocked["put_status"] >= 400 and not blocked["link_arrived"], blocked
        assert clean["put_status"] in (200, 201) and clean["get_status"] == 200, clean
    if mechanism == "ibb":
        assert blocked["notice"], f"alice got no notice naming the blocked file: {blocked}"
    alert = inline.sha_alert(EICAR, ("block", "quarantine"), since)
    assert alert and alert["file"]["name"] == blocked_name(files), alert
    assert inline.sha_alert(CLEAN, ("allow", "alert"), since), f"no allowed-file event for the clean {mechanism} file"
    inline.check_alive()


def blocked_name(files: list[dict]) -> str:
    return next(f["name"] for f in files if f["blocked"])


def _irc_dcc(inline, data: bytes, blocked: bool, **where) -> dict:
    name = f"{'eicar' if blocked else 'numbers'}-{os.urandom(3).hex()}.{'com' if blocked else 'bin'}"
    return inline.net.python("client", ["irc-dcc-scenario", json.dumps({
        "host": SERVER_IP, "port": 6667, "name": name, "data_b64": base64.b64encode(data).decode(),
        "blocked": blocked, **where})])


def test_irc_dcc_eicar_blocked_clean_file_arrives(inline):
    """IRC to ngIRCd at its real address; alice offers bob a DCC SEND from her own address: the offer bob gets
    names the gateway's DCC relay (on by default in transparent mode, at --listen-host), the data connection
    crosses the gateway, EICAR never reaches bob (alice is told), the clean file arrives byte-identical, and a
    message after each arrives."""
    since = inline.mark()
    blocked = _irc_dcc(inline, EICAR, True)
    assert blocked["welcomed"], blocked
    assert blocked["offer"]["host"] == GW_CLIENT_IP and blocked["offer"]["port"] in DCC_RANGE, (
        f"the offer bob got does not name the gateway's relay: {blocked['offer']} ({blocked['sender_address']})")
    assert blocked["received_len"] == 0, f"bob received {blocked['received_len']} bytes of EICAR"
    assert blocked["notice"], f"alice got no notice naming the file: {blocked['notices']}"
    assert blocked["sentinel_arrived"], blocked
    alert = inline.sha_alert(EICAR, ("block", "quarantine"), since)
    assert alert and alert["imguard"]["context"]["transfer_mechanism"] == "dcc", alert
    assert alert["source"]["user"]["name"] == blocked["nicks"]["alice"], alert.get("source")
    clean = _irc_dcc(inline, CLEAN, False)
    assert not clean["connect_error"] and clean["offer"]["host"] == GW_CLIENT_IP, clean
    assert clean["received_sha256"] == clean["sent_sha256"], clean
    assert clean["sentinel_arrived"], clean
    assert inline.sha_alert(CLEAN, ("allow", "alert"), since), "no allowed-file event for the clean DCC file"


@pytest.mark.parametrize("way", ["outbound", "inbound"])
def test_irc_dcc_across_the_perimeter(inline, way):
    """One party outside (its sockets in the server's namespace, straight to ngIRCd), one inside. Outbound: the
    outside receiver is sent to the relay at the gateway's --listen-host and reaches it through the gateway's
    routing (the relay ports are let in). Inbound: the outside sender's offer is rewritten on its way in, the
    inside receiver connects to the relay, which connects on to the outside sender. Either way EICAR never
    arrives, the inside party is told, the clean file arrives byte-identical, a line after each arrives."""
    outside = inline.net.ns("server")
    where = {"bob_ns": outside} if way == "outbound" else {"alice_ns": outside, "told": "bob"}
    since = inline.mark()
    blocked = _irc_dcc(inline, EICAR, True, **where)
    assert blocked["welcomed"], blocked
    assert blocked["offer"]["host"] == GW_CLIENT_IP and blocked["offer"]["port"] in DCC_RANGE, (
        f"the offer bob got does not name the gateway's relay: {blocked['offer']} ({blocked['sender_address']})")
    assert blocked["received_len"] == 0 and blocked["notice"] and blocked["sentinel_arrived"], blocked
    alert = inline.sha_alert(EICAR, ("block", "quarantine"), since)
    # Who sent it, from the gateway's point of view (the direction proper comes from the policy's zones: with
    # every address private here, both parties count as internal).
    context = alert and alert["imguard"]["context"]
    assert context and context["origin"] == ("client" if way == "outbound" else "server"), context
    assert context["sender"].split("!")[0] == blocked["nicks"]["alice"], context       # inbound: nick!user@host
    assert blocked["nicks"]["bob"] in context["recipients"], context
    clean = _irc_dcc(inline, CLEAN, False, **where)
    assert not clean["connect_error"] and clean["offer"]["host"] == GW_CLIENT_IP, clean
    assert clean["received_sha256"] == clean["sent_sha256"] and clean["sentinel_arrived"], clean


def test_legacy_msnp_file_eicar_blocked_clean_file_arrives(inline):
    """MSNP (1863, in the default port map) to the scripted switchboard at its real address: an in-band MSNSLP
    file. The clean file's chunks reach the server byte-identical; EICAR's never do, the client gets the SLP BYE
    and imguard's notice; the text message sent after it reaches the server, and nothing else did."""
    seen = inline.net.python("client", ["msnslp-scenario", json.dumps(inline.msn_spec)])
    assert seen["acks_ok"] and seen["clean_arrived_identical"], seen
    assert seen["bye"] and seen["notice"], seen
    assert seen["server_got_exactly_up_to_the_sentinel"] and not seen["eicar_reached_server"], seen
    alert = inline.wait_alert(lambda e: e.get("file", {}).get("name") == "eicar.com"
                              and e.get("imguard", {}).get("context", {}).get("transfer_mechanism") == "msnslp")
    assert alert and alert["imguard"]["decision"]["action"] == "block", alert
    assert alert["destination"]["ip"] == SERVER_IP and alert["destination"]["port"] == MSN_PORT, alert["destination"]


MSNFTP_SERVER_IP = "10.231.2.7"     # a second switchboard host (1863 on SERVER_IP plays the MSNSLP transcript)


@pytest.mark.parametrize("way", ["inbound", "outbound"])
@pytest.mark.parametrize("kind", ["eicar", "clean"])
def test_legacy_msnftp_direct_file_goes_through_the_side_relay(inline, way, kind):
    """MSNFTP, a direct connection to an arbitrary port (6891) that no redirect rule covers, both ways across the
    perimeter. The listening party's ACCEPT reaches the other one rewritten to the gateway's side relay
    (GW_CLIENT_IP, a port of the default --dcc-relay-ports); the receiver connects there (inbound: our client;
    outbound: the outside party, through the gateway's routing) and imguard connects on to the real listener,
    holding the file. EICAR: the receiver gets MSNFTP's cancel block, our client a notice, and the sentinel after
    it arrives; clean: byte-identical. The scripted parties are tests/test_legacy_gateway.py's."""
    import uuid

    from tests.peers.prosody import stop_process

    if MSNFTP_SERVER_IP not in inline.net.run("server", ["ip", "-o", "addr"]).stdout:
        inline.net.add_address("server", MSNFTP_SERVER_IP)
    spec = {"host": MSNFTP_SERVER_IP, "port": MSN_PORT, "ftp_port": 6891, "tag": uuid.uuid4().hex[:6], "kind": kind,
            "client_host": CLIENT_IP, "result": str(inline.directory / f"msnftp-{way}-{kind}.json")}
    log = inline.directory / f"msnftp-{way}-{kind}.log"
    outside = "msnftp-outside-party" if way == "inbound" else "msnftp-outside-receiver"
    party = inline.net.popen("server", [PYTHON, "-m", "tests.test_legacy_gateway", outside, json.dumps(spec)], log)
    try:
        deadline = time.monotonic() + 15
        while "listening" not in (log.read_text() if log.exists() else ""):
            assert party.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        helper = "msnftp-inside-receiver" if way == "inbound" else "msnftp-inside-sender"
        inside = inline.net.python("client", [helper, json.dumps(spec)], module="tests.test_legacy_gateway")
        if way == "outbound":
            deadline = time.monotonic() + 15
            while party.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert party.returncode == 0, log.read_text()
            seen = {**json.loads(Path(spec["result"]).read_text()), "notice": inside.get("notice", "")}
            assert (kind == "eicar") or inside["listener_got"] == "BYE 16777989\r\n", inside
        else:
            seen = inside
    finally:
        stop_process(party)
    host, port = seen["accept_address"]
    assert host == GW_CLIENT_IP and port in DCC_RANGE, seen               # rewritten to the relay, not 6891
    assert seen["sentinel_arrived"] and not seen.get("eicar_reached_client", seen.get("eicar_reached_server")), seen
    if kind == "eicar":
        assert seen["received_head"] == "010000", seen                     # MSNFTP's cancel block only
        assert seen["name"] in seen["notice"] and "blocked" in seen["notice"], seen
    else:
        assert seen["received_sha256"] == seen["sent_sha256"], seen
    alert = inline.wait_alert(lambda e: e.get("file", {}).get("name") == seen["name"]
                              and e.get("imguard", {}).get("context", {}).get("transfer_mechanism") == "msnftp")
    assert alert and alert["imguard"]["decision"]["action"] == ("block" if kind == "eicar" else "allow"), alert
    assert alert["imguard"]["context"]["direction"] == way, alert


def test_matrix_over_https_eicar_blocked_clean_file_arrives(inline):
    """Matrix (matrix-nio) to Synapse at https://SERVER_IP (443, a redirected HTTP port, TLS intercepted with
    imguard's CA): EICAR uploaded as media is refused with M_FORBIDDEN and is not in Synapse's media store (read on
    disk); a message after it reaches bob by /sync; the clean file is stored byte-identical and bob downloads it."""
    before = inline.synapse.media_files()
    since = inline.mark()
    seen = inline.net.python("client", ["matrix-scenario", json.dumps({
        "host": SERVER_IP, "ca_file": str(inline.ca_file), "eicar_b64": base64.b64encode(EICAR).decode(),
        "clean_b64": base64.b64encode(CLEAN).decode()})], timeout=120)
    assert seen["eicar_upload"]["type"] == "UploadError" and seen["eicar_upload"]["status_code"] == "M_FORBIDDEN", seen
    assert seen["sentinel_sent"] and seen["sentinel_arrived"], seen
    assert seen["clean_upload"] == "UploadResponse" and seen["clean_shared"], seen
    assert seen["clean_download_sha256"] == seen["clean_sha256"], seen
    stored = inline.synapse.stored_media(since=before)
    assert EICAR not in stored and CLEAN in stored, f"{len(stored)} new files in Synapse's media store"
    alert = inline.sha_alert(EICAR, ("block", "quarantine"), since)
    assert alert and alert["network"]["protocol"] == "matrix", alert
    assert alert["source"]["user"]["name"] == seen["users"][0], alert.get("source")


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_sip_message_eicar_blocked_clean_file_arrives(inline, transport):
    """SIP MESSAGE (sipsak) to Kamailio at its real address on 5060: over TCP through the transparent listener (5060
    is in the default port map), over UDP through the worker's reverse:udp listener that SIP_UDP_SERVER redirects
    to (UDP has no transparent mode). A MESSAGE whose body is EICAR gets imguard's 403 and never reaches Kamailio;
    a clean file body arrives byte-identical, and so does the text message sent after it (Kamailio's own log)."""
    clean = b"quarterly numbers, nothing secret\n" * 20
    sentinel = f"sentinel over {transport} {os.urandom(3).hex()}".encode()
    messages = [(EICAR, "application/octet-stream"), (clean, "application/octet-stream"),
                (sentinel, "text/plain;charset=UTF-8")]
    before = len(inline.kamailio.messages())
    since = inline.mark()
    spec = {"host": SERVER_IP, "transport": transport,
            "messages": [{"body_b64": base64.b64encode(body).decode(), "content_type": ct} for body, ct in messages]}
    seen = inline.net.python("client", ["sip-scenario", json.dumps(spec)])
    blocked, passed, after = seen["results"]
    assert blocked["rc"] != 0 and "SIP/2.0 403 Forbidden" in blocked["output"], blocked
    assert "Warning: 399 imguard" in blocked["output"], blocked
    assert passed["rc"] == 0 and after["rc"] == 0, seen
    assert [body.encode() for _, _, _, body in inline.kamailio.messages()[before:]] == [clean, sentinel], (
        inline.kamailio.logs())
    alert = inline.sha_alert(EICAR, ("block", "quarantine"), since)
    assert alert and alert["network"]["protocol"] == "sip", alert
    assert alert["destination"]["ip"] == SERVER_IP and alert["destination"]["port"] == 5060, alert["destination"]


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
