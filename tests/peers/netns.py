"""An inline deployment in miniature: three network namespaces joined by veth pairs, made and removed by the test.

    client  10.231.1.2 ──veth── 10.231.1.1  gateway  10.231.2.1 ──veth── 10.231.2.2  server
            default via .1.1                ip_forward=1                 default via .2.1
                                            chat ports redirected to imguard's transparent listener
                                            (deploy/nftables/imguard.nft or deploy/iptables/imguard-iptables.sh)

    with Topology.create() as net:                # root only; names are unique per run
        net.redirect("nft")                       # the shipped rules, one worker on 8080
        net.popen("server", [...])                # `ip netns exec <ns> ...`
    # every namespace (and with it every veth, rule and socket) is gone here, even after a failure

The same file is the helper run *inside* the namespaces (`ip netns exec NS python -m tests.peers.netns ...`):

    echo-server PORT...            a TCP echo server that first says who connected (the source address it sees)
    echo-client HOST PORT SIZE     sends SIZE random bytes, prints JSON {peer, sent_sha256, received_sha256}
    connect HOST PORT TIMEOUT      does a TCP connection get through? JSON {connected, error}
    flood HOST PORT N SIZE HOLD    N XMPP connections at once, each an endless stanza of SIZE bytes; JSON outcomes
    xmpp-scenario JSON             slixmpp alice and bob through the gateway: a message, then files by IBB, SOCKS5
                                   or HTTP upload, a sentinel after each; JSON out
    irc-dcc-scenario JSON          `irc` library alice and bob: a DCC SEND (either party may be outside), a sentinel
    msn-server JSON / msnslp-scenario JSON   the scripted MSN switchboard and our client's in-band MSNSLP files
    sip-scenario JSON              sipsak MESSAGEs over TCP or UDP
    matrix-scenario JSON           matrix-nio alice and bob over HTTPS: media uploads, a sentinel, a download

Peers in the server namespace, on their standard ports at its real address: NetnsProsody (with upload and proxy65),
NetnsNgircd, start_kamailio, start_synapse (each reusing the configuration of its tests/peers module).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import string
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
NFT_RULES = ROOT / "deploy" / "nftables" / "imguard.nft"
IPTABLES_SCRIPT = ROOT / "deploy" / "iptables" / "imguard-iptables.sh"

CLIENT_IP, GW_CLIENT_IP = "10.231.1.2", "10.231.1.1"
GW_SERVER_IP, SERVER_IP = "10.231.2.1", "10.231.2.2"
ROLES = ("client", "gateway", "server")


class NetnsUnavailable(RuntimeError):
    """The kernel (or the tools) refuse what the topology needs; the message says exactly what."""


def _run(args: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30, **kw)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({result.returncode}): {result.stderr.strip()}")
    return result


# No capability at all, not even in the bounding set, and none regained by exec (SECBIT_NOROOT): what the
# systemd unit of deploy/ grants imguard (CapabilityBoundingSet= empty). The uid stays 0 only because the test
# venv's interpreter lives under /root (mode 0700); every privilege of root is gone.
NO_CAPABILITIES = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs",
                   "--securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked"]


def preflight() -> None:
    """Raise NetnsUnavailable with the exact reason when the kernel refuses namespaces or NAT here (the only
    reasons to skip); RuntimeError when a tool is missing (a setup error: the test fails)."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)")
    tools = ("ip", "nft", "iptables", "setpriv", "prosody", "prosodyctl")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:     # not a kernel limit: a setup step was skipped, so the test fails instead of skipping
        raise RuntimeError(f"not installed: {', '.join(missing)} (run `tools/setup.sh test`)")
    probe = f"igprobe{os.getpid() % 100000}"
    result = _run(["ip", "netns", "add", probe], check=False)
    if result.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add` refused: {result.stderr.strip()}")
    try:
        veth = _run(["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"], check=False)
        if veth.returncode != 0:
            raise NetnsUnavailable(f"the kernel refuses a veth pair: {veth.stderr.strip()}")
        nat = _run(["ip", "netns", "exec", probe, "nft", "add table ip probe; "
                    "add chain ip probe pre { type nat hook prerouting priority dstnat; }; "
                    "add rule ip probe pre tcp dport 1 redirect to :2"], check=False)
        if nat.returncode != 0:
            raise NetnsUnavailable(f"the kernel refuses an nftables NAT redirect in a namespace: {nat.stderr.strip()}")
    finally:
        _run(["ip", "netns", "del", probe], check=False)


@dataclass
class Topology:
    prefix: str
    names: dict[str, str] = field(default_factory=dict)
    backend: str = ""
    redirect_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls) -> "Topology":
        """client, gateway and server namespaces; on any failure what was made is removed again."""
        net = cls(prefix=f"ig{uuid.uuid4().hex[:5]}")
        net.names = {role: f"{net.prefix}-{role[:3]}" for role in ROLES}
        try:
            net._build()
        except BaseException:
            net.destroy()
            raise
        return net

    def _build(self) -> None:
        p = self.prefix
        for ns in self.names.values():
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # veth names live in the root namespace until moved: keep them unique and <= 15 characters.
        links = [(f"{p}c0", "client", CLIENT_IP, f"{p}g0", GW_CLIENT_IP),
                 (f"{p}s0", "server", SERVER_IP, f"{p}g1", GW_SERVER_IP)]
        for end, role, ip, gw_end, gw_ip in links:
            _run(["ip", "link", "add", end, "type", "veth", "peer", "name", gw_end])
            _run(["ip", "link", "set", end, "netns", self.names[role]])
            _run(["ip", "link", "set", gw_end, "netns", self.names["gateway"]])
            _run(["ip", "-n", self.names[role], "addr", "add", f"{ip}/24", "dev", end])
            _run(["ip", "-n", self.names["gateway"], "addr", "add", f"{gw_ip}/24", "dev", gw_end])
            _run(["ip", "-n", self.names[role], "link", "set", end, "up"])
            _run(["ip", "-n", self.names["gateway"], "link", "set", gw_end, "up"])
            _run(["ip", "-n", self.names[role], "route", "add", "default", "via", gw_ip])
        # The same sysctls as deploy/sysctl/90-imguard.conf, in the gateway namespace only.
        for key, value in (("net.ipv4.ip_forward", "1"), ("net.ipv4.conf.all.send_redirects", "0"),
                           ("net.ipv4.conf.default.send_redirects", "0")):
            self.run("gateway", ["sysctl", "-qw", f"{key}={value}"])

    def add_address(self, role: str, ip: str) -> None:
        """One more address on `role`'s veth (the server side: another "server" behind the gateway)."""
        dev = f"{self.prefix}{role[0]}0"
        _run(["ip", "-n", self.names[role], "addr", "add", f"{ip}/24", "dev", dev])

    @property
    def lan_if(self) -> str:
        """The gateway's interface facing the clients."""
        return f"{self.prefix}g0"

    def ns(self, role: str) -> str:
        return self.names[role]

    def exec_args(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.names[role]]

    def run(self, role: str, args: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return _run(self.exec_args(role) + [str(a) for a in args], check=check, **kw)

    def popen(self, role: str, args: list[str], log: Path, env: dict | None = None, cwd: Path = ROOT,
              no_capabilities: bool = False) -> subprocess.Popen:
        """A process in `role`'s namespace, in its own session (killed with its group by stop_process).
        `no_capabilities`: every capability dropped (NO_CAPABILITIES), as imguard runs under systemd."""
        prefix = self.exec_args(role) + (NO_CAPABILITIES if no_capabilities else [])
        out = open(log, "wb")
        try:
            return subprocess.Popen(prefix + [str(a) for a in args], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT),
                                         **(env or {})})
        finally:
            out.close()

    def python(self, role: str, args: list[str], timeout: float = 60.0, module: str = "tests.peers.netns") -> dict:
        """Run a helper (this module's, or `module`'s) in `role`'s namespace; its last stdout line is JSON."""
        prefix = self.exec_args(role)
        result = subprocess.run(prefix + [str(PYTHON), "-m", module, *map(str, args)],
                                capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        if result.returncode != 0 or not lines:
            raise AssertionError(f"helper {args[0]} in {role} failed ({result.returncode}):\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return json.loads(lines[-1])

    # --- the redirect, with the files admins deploy -------------------------------------------------

    def redirect(self, backend: str, chat_ports: list[int] | None = None, imguard_ports: list[int] = (8080,),
                 exclude: list[str] = ("192.0.2.0/24",), sip_udp_server: str = "") -> None:
        """Load deploy/nftables/imguard.nft or run deploy/iptables/imguard-iptables.sh in the gateway namespace,
        with only their site parameters set: LAN_IF, IMGUARD_PORTS, EXCLUDE, SIP_UDP_SERVER when given (and
        CHAT_PORTS only when `chat_ports` is given; None keeps the shipped port lists: imguard's defaults)."""
        self.backend = backend
        if backend == "nft":
            self.run("gateway", ["nft", "-f", "-"],
                     input=render_nft(self.lan_if, chat_ports, imguard_ports, exclude, sip_udp_server))
        elif backend == "iptables":
            self.redirect_env = {"LAN_IF": self.lan_if, "IMGUARD_PORTS": ",".join(map(str, imguard_ports)),
                                 "EXCLUDE": " ".join(exclude)}
            if sip_udp_server:
                self.redirect_env["SIP_UDP_SERVER"] = sip_udp_server
            if chat_ports is not None:
                self.redirect_env["CHAT_PORTS"] = ",".join(map(str, chat_ports))
            self.run("gateway", ["env", *[f"{k}={v}" for k, v in self.redirect_env.items()],
                                 "sh", str(IPTABLES_SCRIPT), "up"])
        else:
            raise ValueError(f"unknown redirect backend {backend!r}")

    def ruleset(self) -> str:
        if self.backend == "iptables":
            return self.run("gateway", ["iptables-save"], check=False).stdout
        return self.run("gateway", ["nft", "list", "ruleset"], check=False).stdout

    def conntrack_count(self) -> int:
        path = "/proc/sys/net/netfilter/nf_conntrack_count"
        return int(self.run("gateway", ["cat", path]).stdout.strip() or 0)

    # --- teardown -----------------------------------------------------------------------------------

    def destroy(self) -> None:
        """Kill what still runs in the namespaces (only processes started in them), then delete them."""
        for ns in self.names.values():
            pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
        for ns in self.names.values():
            _run(["ip", "netns", "del", ns], check=False)

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()


def render_nft(lan_if: str, chat_ports: list[int] | None, imguard_ports: list[int], exclude: list[str],
               sip_udp_server: str = "") -> str:
    """deploy/nftables/imguard.nft with its site `define` lines (LAN_IF, IMGUARD_PORTS, EXCLUDE; CHAT_PORTS and
    SIP_UDP_SERVER when given) and, for several workers, the numgen map set to these values; nothing else."""
    text = NFT_RULES.read_text()
    values = {"LAN_IF": f'"{lan_if}"', "IMGUARD_PORTS": "{ " + ", ".join(map(str, imguard_ports)) + " }",
              "EXCLUDE": "{ " + ", ".join(exclude) + " }"}
    if sip_udp_server:
        values["SIP_UDP_SERVER"] = sip_udp_server
    if chat_ports is not None:
        values["CHAT_PORTS"] = "{ " + ", ".join(map(str, chat_ports)) + " }"
    for name, value in values.items():
        text, n = re.subn(rf"^define {name} = .*$", f"define {name} = {value}", text, flags=re.M)
        assert n == 1, f"{NFT_RULES}: no `define {name}` line"
    workers = ", ".join(f"{i} : {port}" for i, port in enumerate(imguard_ports))
    text, n = re.subn(r"numgen inc mod \d+ map \{[^}]*\}", f"numgen inc mod {len(imguard_ports)} map {{ {workers} }}",
                      text)
    assert n == 1, f"{NFT_RULES}: no numgen redirect line"
    return text


def shipped_lists() -> dict[str, dict[str, set[int]]]:
    """The port lists of the shipped redirect files: {"nft"|"iptables": {"CHAT_PORTS": {...}, "HTTP_PORTS": ...,
    "RELAY_PORTS": ...}} (ranges expanded)."""
    def ports(text: str) -> set[int]:
        out: set[int] = set()
        for item in re.split(r"[,\s]+", text.strip("{} ")):
            if item:
                first, _, last = item.replace(":", "-").partition("-")
                out.update(range(int(first), int(last or first) + 1))
        return out
    nft = {m.group(1): ports(m.group(2)) for m in re.finditer(r"^define (\w+_PORTS) = (\{.*\})$",
                                                                NFT_RULES.read_text(), re.M)}
    ipt = {m.group(1): ports(m.group(2)) for m in re.finditer(r"^(\w+_PORTS)=\$\{\1:-([^}]*)\}$",
                                                                IPTABLES_SCRIPT.read_text(), re.M)}
    return {"nft": nft, "iptables": ipt}


# --- Prosody in the server namespace --------------------------------------------------------------------

PROSODY_CONFIG = """\
-- Prosody in the server namespace of tests/peers/netns.py: standard ports on the server's own address.
run_as_root = true
daemonize = false
pidfile = "$dir/prosody.pid"
data_path = "$dir/data"
log = { debug = "$dir/prosody.log"; error = "$dir/prosody.err" }
interfaces = { $interfaces }
local_interfaces = { $interfaces }
c2s_ports = { 5222 }
c2s_direct_tls_ports = { 5223 }
s2s_ports = { }
http_ports = { 5280 }
http_interfaces = { $interfaces }
https_ports = { 5281 }                    -- XEP-0363 uploads over HTTPS (mod_http_file_share)
https_interfaces = { $interfaces }
https_ssl = { certificate = "$dir/certs/localhost.crt"; key = "$dir/certs/localhost.key" }
proxy65_ports = { 7777 }                  -- XEP-0065 SOCKS5 proxy, its usual port
proxy65_interfaces = { $interfaces }
http_default_host = "upload.localhost"
modules_enabled = { "roster"; "saslauth"; "tls"; "disco"; "ping"; "posix"; "http" }
modules_disabled = { "s2s" }
authentication = "internal_plain"
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
c2s_stanza_size_limit = 1024*1024
ssl = { certificate = "$dir/certs/localhost.crt"; key = "$dir/certs/localhost.key" }
VirtualHost "localhost"
Component "upload.localhost" "http_file_share"
  http_file_share_size_limit = 10*1024*1024
  http_external_url = "https://$server_ip:5281/"
Component "proxy.localhost" "proxy65"
  proxy65_address = "$server_ip"
"""


@dataclass
class NetnsProsody:
    directory: Path
    process: subprocess.Popen
    ca_file: Path
    accounts: dict[str, str]
    host: str = SERVER_IP
    c2s_port: int = 5222
    tls_port: int = 5223
    domain: str = "localhost"

    @classmethod
    def start(cls, net: Topology, directory: Path, ips: tuple[str, ...] = (SERVER_IP,),
              timeout: float = 20.0) -> "NetnsProsody":
        """Prosody listening on `ips` (addresses of the server namespace) on the standard ports."""
        from tests.peers.prosody import ACCOUNTS, PeerError, make_certificates
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "data").mkdir(exist_ok=True)
        certs = make_certificates(directory / "certs", ips=tuple(ips))     # localhost, upload., proxy. and ips
        config = directory / "prosody.cfg.lua"
        config.write_text(string.Template(PROSODY_CONFIG).substitute(
            dir=str(directory), interfaces="; ".join(f'"{ip}"' for ip in ips), server_ip=ips[0]))
        accounts = {u: ACCOUNTS[u] for u in ("alice", "bob")}
        for user, password in accounts.items():
            _run(["prosodyctl", "--config", str(config), "register", user, "localhost", password])
        process = net.popen("server", ["prosody", "--config", str(config), "-F"], directory / "stdout.log",
                            cwd=directory)
        server = cls(directory, process, certs.ca_file, accounts)
        deadline = time.monotonic() + timeout
        while not net.run("server", ["ss", "-Hltn", "sport = :5222"], check=False).stdout.strip():
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise PeerError(f"prosody did not listen on {SERVER_IP}:5222:\n{server.logs()}")
            time.sleep(0.1)
        return server

    def stop(self) -> None:
        from tests.peers.prosody import stop_process
        stop_process(self.process)

    def logs(self, lines: int = 40) -> str:
        parts = []
        for name in ("stdout.log", "prosody.err", "prosody.log"):
            path = self.directory / name
            if path.exists():
                parts.append(f"--- {path} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)


# --- ngIRCd in the server namespace --------------------------------------------------------------------------

@dataclass
class NetnsNgircd:
    """ngIRCd (tests/peers/ngircd.py's binary and configuration template) on the server's address, standard ports
    6667 and 6697 (TLS, a certificate of a throwaway CA)."""
    directory: Path
    process: subprocess.Popen
    ca_file: Path
    port: int = 6667
    tls_port: int = 6697

    @classmethod
    def start(cls, net: Topology, directory: Path, timeout: float = 20.0) -> "NetnsNgircd":
        from tests.peers.ngircd import HERE, _binary
        from tests.peers.prosody import PeerError, make_certificates
        directory.mkdir(parents=True, exist_ok=True)
        certs = make_certificates(directory / "certs", names=("localhost",), ips=(SERVER_IP,))
        text = string.Template((HERE / "ngircd.conf.in").read_text()).substitute(
            dir=str(directory), port=cls.port, tls_port=cls.tls_port, cert_file=certs.cert_file,
            key_file=certs.key_file)
        text, n = re.subn(r"^(\s*Listen = ).*$", rf"\g<1>{SERVER_IP}", text, flags=re.M)
        assert n == 1, "tests/peers/ngircd.conf.in: no Listen line"
        config = directory / "ngircd.conf"
        config.write_text(text)
        process = net.popen("server", [_binary(), "-n", "-f", config], directory / "ngircd.log", cwd=directory)
        server = cls(directory, process, certs.ca_file)
        deadline = time.monotonic() + timeout
        while not all(net.run("server", ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout.strip()
                      for port in (cls.port, cls.tls_port)):
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise PeerError(f"ngircd did not listen on {SERVER_IP}:{cls.port}:\n{server.logs()}")
            time.sleep(0.1)
        return server

    def stop(self) -> None:
        from tests.peers.prosody import stop_process
        stop_process(self.process)

    def logs(self, lines: int = 40) -> str:
        path = self.directory / "ngircd.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


# --- Kamailio in the server namespace ----------------------------------------------------------------------

def start_kamailio(net: Topology, directory: Path, timeout: float = 15.0):
    """tests/peers/sip_peers.py's Kamailio (its configuration, its MESSAGE log) on the server's address, SIP's
    standard port 5060, TCP and UDP."""
    from tests.peers.prosody import PeerError
    from tests.peers.sip_peers import _SDP, CONFIG, MODULE_DIRS, Kamailio, binary
    exe = binary("kamailio")
    mpath = next((d for d in MODULE_DIRS if Path(d, "sl.so").exists()), None)
    if exe is None or mpath is None:
        raise PeerError("kamailio (and its modules) is not installed: tools/setup.sh test installs it")
    directory.mkdir(parents=True, exist_ok=True)
    text = CONFIG.format(port=5060, mpath=mpath + "/", sdp=_SDP.format(msrp_port=2855))
    text, n = re.subn(r"^listen=(tcp|udp):127\.0\.0\.1:", rf"listen=\g<1>:{SERVER_IP}:", text, flags=re.M)
    assert n == 2, "tests/peers/sip_peers.py: no tcp and udp listen lines"
    config = directory / "kamailio.cfg"
    config.write_text(text)
    process = net.popen("server", [exe, "-f", config, "-DD", "-E", "-w", directory], directory / "kamailio.log",
                        cwd=directory)
    server = Kamailio(directory, 5060, process)
    deadline = time.monotonic() + timeout
    while "Listening on" not in server.logs() or not net.run("server", ["ss", "-Hltn", "sport = :5060"],
                                                              check=False).stdout.strip():
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise PeerError(f"kamailio did not listen on {SERVER_IP}:5060:\n{server.logs()}")
        time.sleep(0.05)
    return server


def _sip_scenario(spec: dict) -> dict:
    """sipsak (tests/peers/sip_peers.py) sends each of `messages` ({body_b64, content_type}) as a SIP MESSAGE to
    bob at the server's real address over `transport`: [{rc, output}] in order (sipsak waits for the final
    response: 0 only for a 2xx)."""
    import base64
    from tests.peers.sip_peers import sipsak
    from tests.test_sip_support import message
    host, out = spec["host"], []
    for cseq, item in enumerate(spec["messages"], 1):
        request = message(base64.b64decode(item["body_b64"]), content_type=item["content_type"],
                          frm=f"<sip:alice@{host}>", to=f"<sip:bob@{host}>", ruri=f"sip:bob@{host}", cseq=cseq, vias=1)
        rc, output = sipsak(request, host, 5060, spec["transport"])
        out.append({"rc": rc, "output": output[-3000:]})
    return {"results": out}


# --- Synapse in the server namespace -----------------------------------------------------------------------

def start_synapse(net: Topology, directory: Path, timeout: float = 90.0):
    """tests/peers/synapse.py's Synapse (its configuration, its media store) serving the client API over HTTPS on the
    server's address, port 443 (a certificate of a throwaway CA: the Synapse object's `ca_file`)."""
    from tests.peers.prosody import PeerError, make_certificates
    from tests.peers.synapse import CONFIG, LOG_CONFIG, RELAXED, SERVER_NAME, SYNAPSE_PYTHON, Synapse
    if not SYNAPSE_PYTHON.exists():
        raise PeerError(f"{SYNAPSE_PYTHON} is missing: run `tools/setup.sh test`")
    directory.mkdir(parents=True, exist_ok=True)
    certs = make_certificates(directory / "certs", names=(SERVER_NAME,), ips=(SERVER_IP,))
    text = CONFIG.format(server_name=SERVER_NAME, dir=directory, port=443, relaxed=json.dumps(RELAXED))
    for old, new in (("bind_addresses: ['127.0.0.1']", f"bind_addresses: ['{SERVER_IP}']"),
                     ("tls: false", "tls: true")):
        assert text.count(old) == 1, f"tests/peers/synapse.py: no `{old}` in CONFIG"
        text = text.replace(old, new)
    text += f"tls_certificate_path: {certs.cert_file}\ntls_private_key_path: {certs.key_file}\n"
    config = directory / "homeserver.yaml"
    config.write_text(text)
    (directory / "log.config").write_text(LOG_CONFIG.format(dir=directory))
    keys = subprocess.run([str(SYNAPSE_PYTHON), "-m", "synapse.app.homeserver", "--config-path", str(config),
                           "--generate-keys"], capture_output=True, text=True, timeout=120, cwd=directory)
    if keys.returncode != 0:
        raise PeerError(f"synapse --generate-keys failed ({keys.returncode}):\n{keys.stdout}\n{keys.stderr}")
    process = net.popen("server", [SYNAPSE_PYTHON, "-m", "synapse.app.homeserver", "--config-path", config],
                        directory / "stdout.log", cwd=directory)
    server = Synapse(directory, 443, process=process)
    server.ca_file = certs.ca_file
    deadline = time.monotonic() + timeout
    while not net.run("server", ["ss", "-Hltn", "sport = :443"], check=False).stdout.strip():
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise PeerError(f"synapse did not listen on {SERVER_IP}:443:\n{server.logs()}")
        time.sleep(0.2)
    return server


async def _matrix_scenario(spec: dict) -> dict:
    """matrix-nio alice and bob at https://SERVER_IP (verifying `ca_file`) in one room: alice uploads EICAR (the
    answer is kept), then sends a sentinel message that bob must get by /sync; then she uploads the clean file,
    shares it, and bob downloads it. JSON: what each step answered."""
    import base64
    import hashlib
    import io
    import ssl
    import nio
    context = ssl.create_default_context(cafile=spec["ca_file"])
    base = f"https://{spec['host']}"
    out: dict = {}
    tag = uuid.uuid4().hex[:6]
    clients = []
    try:
        for name in ("alice", "bob"):
            user = f"{name}-{tag}"
            client = nio.AsyncClient(base, user, ssl=context)
            clients.append(client)
            resp = await client.register(user, f"{user}-password-1")
            assert isinstance(resp, nio.RegisterResponse), f"register failed: {resp}"
        alice, bob = clients
        room = await alice.room_create(invite=[bob.user_id])
        assert isinstance(room, nio.RoomCreateResponse), room
        joined = await bob.join(room.room_id)
        assert isinstance(joined, nio.JoinResponse), joined
        eicar = base64.b64decode(spec["eicar_b64"])
        resp, _ = await alice.upload(io.BytesIO(eicar), content_type="application/octet-stream", filename="eicar.com",
                                     filesize=len(eicar))
        out["eicar_upload"] = {"type": type(resp).__name__, "status_code": getattr(resp, "status_code", None),
                               "message": getattr(resp, "message", None)}
        sentinel = f"sentinel after the blocked upload {tag}"
        sent = await alice.room_send(room.room_id, "m.room.message", {"msgtype": "m.text", "body": sentinel})
        out["sentinel_sent"] = isinstance(sent, nio.RoomSendResponse)
        out["sentinel_arrived"] = False
        deadline = time.monotonic() + 20
        since = None
        while not out["sentinel_arrived"] and time.monotonic() < deadline:
            synced = await bob.sync(timeout=2000, since=since)
            if isinstance(synced, nio.SyncResponse):
                since = synced.next_batch
                timeline = synced.rooms.join.get(room.room_id)
                out["sentinel_arrived"] = bool(timeline) and any(
                    getattr(e, "body", None) == sentinel for e in timeline.timeline.events)
        clean = base64.b64decode(spec["clean_b64"])
        resp, _ = await alice.upload(io.BytesIO(clean), content_type="application/octet-stream",
                                     filename=f"numbers-{tag}.bin", filesize=len(clean))
        out["clean_upload"] = type(resp).__name__
        if isinstance(resp, nio.UploadResponse):
            shared = await alice.room_send(room.room_id, "m.room.message", {
                "msgtype": "m.file", "body": f"numbers-{tag}.bin", "url": resp.content_uri,
                "info": {"size": len(clean)}})
            out["clean_shared"] = isinstance(shared, nio.RoomSendResponse)
            got = await bob.download(resp.content_uri)
            body = getattr(got, "body", b"") or b""
            out["clean_download_sha256"] = hashlib.sha256(body).hexdigest()
        out["clean_sha256"] = hashlib.sha256(clean).hexdigest()
        out["users"] = [c.user_id for c in clients]
    finally:
        for client in clients:
            await client.close()
    return out


# --- helpers run inside a namespace ------------------------------------------------------------------------

def _echo_server(ports: list[int]) -> None:
    """Says `peer HOST:PORT\\n` (the source address it sees), then echoes everything back."""
    import socket
    import threading

    def serve(conn: socket.socket, addr) -> None:
        with conn:
            conn.sendall(f"peer {addr[0]}:{addr[1]}\n".encode())
            while data := conn.recv(65536):
                conn.sendall(data)

    def listen(port: int) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(16)
        while True:
            conn, addr = s.accept()
            threading.Thread(target=serve, args=(conn, addr), daemon=True).start()

    for port in ports[1:]:
        threading.Thread(target=listen, args=(port,), daemon=True).start()
    print("listening", flush=True)
    listen(ports[0])


def _echo_client(host: str, port: int, size: int) -> dict:
    import hashlib
    import socket
    payload = os.urandom(size)
    with socket.create_connection((host, port), timeout=10) as s:
        hello = b""
        while not hello.endswith(b"\n"):
            chunk = s.recv(1)
            if not chunk:
                break
            hello += chunk
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := s.recv(65536):
            received += chunk
        local = s.getsockname()
    return {"peer": hello.decode().strip().removeprefix("peer "), "local": f"{local[0]}:{local[1]}",
            "sent_sha256": hashlib.sha256(payload).hexdigest(), "received_sha256": hashlib.sha256(received).hexdigest(),
            "received": len(received)}


async def _flood(host: str, port: int, connections: int, size: int, hold: float, wait_greeting: bool = False) -> dict:
    """`connections` XMPP clients at once, each sending a stream header and then one endless stanza of `size`
    bytes (with `wait_greeting`, only once the server's stream header came back: the session is up); they stay
    open `hold` seconds. Counts the connections the other end closed."""
    import asyncio
    header = (b"<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' "
              b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")
    chunk = b"<message to='bob@localhost'><body>" + b"A" * (64 * 1024)

    async def one() -> str:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        except (OSError, asyncio.TimeoutError) as e:
            return f"connect: {type(e).__name__}"
        try:
            writer.write(header)
            if wait_greeting:
                await asyncio.wait_for(reader.read(4096), 30)
            sent = 0
            while sent < size:
                writer.write(chunk[: size - sent] if sent else chunk)
                sent += len(chunk)
                await asyncio.wait_for(writer.drain(), 10)
            deadline = asyncio.get_running_loop().time() + hold
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                data = await asyncio.wait_for(reader.read(65536), left)
                if not data:
                    return "closed"
            return "open"
        except (ConnectionError, asyncio.TimeoutError) as e:
            return "closed" if isinstance(e, ConnectionError) else "open"
        finally:
            writer.close()

    results = await asyncio.gather(*(one() for _ in range(connections)))
    return {outcome: results.count(outcome) for outcome in set(results)}


async def _xmpp_scenario(spec: dict) -> dict:
    """alice and bob log in at the server's real address; alice sends bob a message, then (`files`: a list of
    {mechanism: ibb|socks5|upload, name, data_b64}) each file by its mechanism, each followed by a sentinel
    message waited for (tests/test_e2e_xmpp.py's `transfer`: the same moves as the end-to-end tests). The old
    form `file_b64` + `file_name` is one IBB file with the notice alice got."""
    import base64
    import hashlib
    from tests.test_e2e_xmpp import transfer
    from tests.xmpp_clients import Client, Endpoint, error_text
    ca_file = Path(spec["ca_file"])
    endpoint = Endpoint(spec["host"], spec["port"], spec.get("mode", "starttls"), ca_file=ca_file,
                        http_ca_file=ca_file)
    out: dict = {}
    tag = uuid.uuid4().hex[:8]
    async with Client.connected(endpoint, f"alice@localhost/a-{tag}", spec["alice_pw"]) as alice, \
            Client.connected(endpoint, f"bob@localhost/b-{tag}", spec["bob_pw"]) as bob:
        cert = alice.peer_certificate()
        out["issuer"] = str(cert.get("issuer", ""))
        body = spec.get("body") or f"hello bob across the gateway {tag}"
        alice.send_chat(bob.jid, body)
        out["message_arrived"] = (await bob.wait_message(body, timeout=10)) is not None
        out["body"] = body
        files = list(spec.get("files", []))
        if spec.get("file_b64") is not None:
            files.append({"mechanism": "ibb", "name": spec["file_name"], "data_b64": spec["file_b64"]})
        out["files"] = []
        for item in files:
            data = base64.b64decode(item["data_b64"])
            seen = await transfer(None, item["mechanism"], alice, bob, item["name"], data)
            received = seen.pop("received")
            seen["proxies"] = {str(k): str(v) for k, v in seen.get("proxies", {}).items()}     # JIDs
            seen.update(received_sha256=hashlib.sha256(received).hexdigest(), received_len=len(received),
                        sent_sha256=hashlib.sha256(data).hexdigest(), streamhosts=bob.received.streamhosts[-2:])
            seen["notice"] = False
            if item.get("blocked", True):       # a clean file gets no notice: not waited for
                name = item["name"]
                seen["notice"] = bool(await alice.wait_for(
                    lambda r, name=name: [m for m in r.messages if name in (m["body"] or "") + error_text(m)],
                    timeout=5))
            after = f"after the file {item['name']} {tag}"
            alice.send_chat(bob.jid, after)
            seen["after_arrived"] = (await bob.wait_message(after, timeout=10)) is not None
            out["files"].append(seen)
        if spec.get("file_b64") is not None:        # the old form's keys
            last = out["files"][-1]
            out.update({k: last[k] for k in ("sender_error", "received_sha256", "received_len", "notice",
                                            "after_arrived")})
    return out


@contextlib.contextmanager
def entered(netns_name: str):
    """Sockets made inside are made in network namespace `netns_name` (this thread only: setns); '' = stay."""
    if not netns_name:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns_name}", os.O_RDONLY)
    try:
        os.setns(target, os.CLONE_NEWNET)
        yield
    finally:
        os.setns(own, os.CLONE_NEWNET)
        os.close(own)
        os.close(target)


def _irc_dcc_scenario(spec: dict) -> dict:
    """alice and bob (the `irc` library, cleartext) log in at the server's real address; alice offers bob a file
    by DCC SEND from her own address (active DCC: she listens); bob connects to whatever address the offer he
    *receives* names, takes the bytes and ACKs them. Then alice sends bob a sentinel line, waited for. JSON:
    the offer bob got, what he received, the imguard notices each got, whether the sentinel arrived.
    `alice_ns` / `bob_ns`: the network namespace that person's sockets are made in (the server's: outside the
    gateway, straight to the server); by default the helper's own (the client's: behind the gateway)."""
    import base64
    import hashlib
    import socket
    import struct
    import irc.client as irc_client

    data = base64.b64decode(spec["data_b64"])
    reactor = irc_client.Reactor()
    tag = uuid.uuid4().hex[:4]
    state: dict = {"welcomed": set(), "offer": None, "received": bytearray(), "private": [],
                   "notices": {"alice": [], "bob": []}, "receiver_closed": False, "connect_error": "", "acked": 0}
    nicks = {"alice": f"alice_{tag}", "bob": f"bob_{tag}"}
    where = {"alice": spec.get("alice_ns", ""), "bob": spec.get("bob_ns", "")}
    conns = {}
    for role, nick in nicks.items():
        with entered(where[role]):
            conns[role] = reactor.server().connect(spec["host"], spec["port"], nick)
    role_of = {conn: role for role, conn in conns.items()}
    dcc = {"sender": None, "receiver": None}

    def on_welcome(conn, event):
        state["welcomed"].add(role_of.get(conn))

    def on_privnotice(conn, event):
        if role_of.get(conn) and event.source and irc_client.NickMask(event.source).nick == "imguard":
            state["notices"][role_of[conn]].append(event.arguments[0])

    def on_privmsg(conn, event):
        if role_of.get(conn) == "bob":
            state["private"].append(event.arguments[0])

    def on_ctcp(conn, event):
        if role_of.get(conn) != "bob" or event.arguments[0] != "DCC" or len(event.arguments) < 2:
            return
        words = event.arguments[1].split()
        if len(words) >= 5 and words[0].upper() == "SEND" and state["offer"] is None:
            state["offer"] = {"name": words[1], "host": irc_client.ip_numstr_to_quad(words[2]),
                              "port": int(words[3]), "size": int(words[4])}
            dcc["receiver"] = reactor.dcc("raw")
            try:
                with entered(where["bob"]):
                    dcc["receiver"].connect(state["offer"]["host"], state["offer"]["port"])
            except irc_client.DCCConnectionError as e:
                state["connect_error"] = str(e)

    def on_dcc_connect(conn, event):
        if conn is dcc["sender"]:
            conn.socket.sendall(data)

    def on_dccmsg(conn, event):
        chunk = event.arguments[0]
        if conn is dcc["receiver"]:
            state["received"] += chunk
            conn.send_bytes(struct.pack("!I", len(state["received"]) & 0xFFFFFFFF))
            if len(state["received"]) >= len(data):
                conn.disconnect()
        elif conn is dcc["sender"] and len(chunk) >= 4:
            state["acked"] = struct.unpack("!I", chunk[-4:])[0]
            if state["acked"] >= len(data):
                conn.disconnect()

    def on_dcc_disconnect(conn, event):
        if conn is dcc["receiver"]:
            state["receiver_closed"] = True

    for name, handler in (("welcome", on_welcome), ("privnotice", on_privnotice), ("privmsg", on_privmsg),
                          ("ctcp", on_ctcp), ("dcc_connect", on_dcc_connect), ("dccmsg", on_dccmsg),
                          ("dcc_disconnect", on_dcc_disconnect)):
        reactor.add_global_handler(name, handler)

    def pump(until, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                return False
            reactor.process_once(0.05)
        return True

    out: dict = {"welcomed": pump(lambda: len(state["welcomed"]) == 2, 15)}
    if out["welcomed"]:
        me = conns["alice"].socket.getsockname()[0]         # alice's own address, as a client puts in an offer
        dcc["sender"] = reactor.dcc("raw")
        with entered(where["alice"]):
            dcc["sender"].listen((me, 0))
        conns["alice"].ctcp("DCC", nicks["bob"], f"SEND {spec['name']} {irc_client.ip_quad_to_numstr(me)} "
                                                   f"{dcc['sender'].localport} {len(data)}")
        out["done"] = pump(lambda: state["receiver_closed"] or state["connect_error"], 20)
        if spec.get("blocked"):         # the inside party is told: the sender outbound, the receiver inbound
            told = spec.get("told", "alice")
            out["notice"] = pump(lambda: any(spec["name"] in n for n in state["notices"][told]), 10)
        sentinel = f"sentinel after {spec['name']} {tag}"
        conns["alice"].privmsg(nicks["bob"], sentinel)
        out["sentinel_arrived"] = pump(lambda: sentinel in state["private"], 10)
        out.update(sender_address=f"{me}:{dcc['sender'].localport}", offer=state["offer"],
                   connect_error=state["connect_error"], received_len=len(state["received"]),
                   received_sha256=hashlib.sha256(bytes(state["received"])).hexdigest(),
                   sent_sha256=hashlib.sha256(data).hexdigest(), notices=state["notices"], nicks=nicks)
    for conn in conns.values():
        with contextlib.suppress(Exception):
            conn.disconnect("bye")
    with contextlib.suppress(socket.error):
        reactor.process_once(0.1)
    return out


def msnslp_parts(eicar: bytes, clean: bytes) -> dict[str, list]:
    """The MSNP switchboard of tests/test_legacy_gateway.py's in-band MSNSLP test, as JSON-able parts
    ([from_client, base64]): the capture's first lines, then an MSNSLP offer of a clean file with its data
    chunks, an offer of EICAR with its chunks, and a plain text message as the sentinel."""
    import base64
    from tests.test_msnp import ME, P2PHeader, data_chunks, p2p_msg, slp_chunks, slp_invite, text_msg, transcript

    def offer(name: str, payload: bytes, ident: int, trid: int):
        chunks = slp_chunks(slp_invite(name, len(payload)), ident)
        invite = [(True, p2p_msg(trid + i, h, c, 0)) for i, (h, c) in enumerate(chunks)]
        ok = b"MSNSLP/1.0 200 OK\r\nTo: <msnmsgr:" + ME.encode() + b">\r\n\r\n\x00"
        return invite + [(False, p2p_msg(0, P2PHeader(0, ident + 1, 0, len(ok), len(ok), 0), ok, 0, ME,
                                         inbound=True))]

    parts = {"prefix": transcript("msnms_sb2.json")[:3], "first": offer("notes.txt", clean, 77, 200),
             "clean": [(True, p2p_msg(300 + i, h, c, 2)) for i, (h, c) in enumerate(data_chunks(clean))],
             "second": offer("eicar.com", eicar, 88, 400),
             "eicar": [(True, p2p_msg(500 + i, h, c, 2)) for i, (h, c) in enumerate(data_chunks(eicar))],
             "sentinel": [(True, text_msg(600, "sentinel after the blocked file"))]}
    return {k: [[fc, base64.b64encode(d).decode()] for fc, d in v] for k, v in parts.items()}


def _parts(spec: dict) -> dict[str, list[tuple[bool, bytes]]]:
    import base64
    parts = json.loads(Path(spec["parts"]).read_text())
    return {k: [(fc, base64.b64decode(d)) for fc, d in v] for k, v in parts.items()}


async def _msn_server(spec: dict) -> None:
    """The scripted switchboard (tests/test_legacy_gateway.py's TranscriptServer) on HOST:PORT; what it received
    is written to `received` after every read (the client in the other namespace reads it)."""
    import asyncio
    from tests.test_legacy_gateway import TranscriptServer
    parts = _parts(spec)
    server = TranscriptServer(parts["prefix"] + parts["first"] + parts["clean"] + parts["second"])
    out = Path(spec["received"])

    class Recording(bytearray):
        def __iadd__(self, chunk):
            super().__iadd__(chunk)
            out.write_bytes(bytes(self))
            return self

    async def handle(reader, writer):
        server.received = Recording()
        await server.handle(reader, writer)
    listener = await asyncio.start_server(handle, spec["host"], spec["port"])
    print("listening", flush=True)
    async with listener:
        await listener.serve_forever()


async def _msnslp_scenario(spec: dict) -> dict:
    """Our MSN client (tests/test_legacy_gateway.py's in-band MSNSLP test, moved into the client namespace):
    a clean file's chunks are ACKed and reach the switchboard byte-identical; EICAR's chunks never do, the client
    gets the SLP BYE and imguard's notice naming the file; then a text message (the sentinel) reaches the server
    after everything sent before it."""
    import asyncio
    from imguard.protocols.msnp import CommandDecoder
    from tests.test_legacy_gateway import TIMEOUT, client_bytes, play_client
    parts = _parts(spec)
    received = Path(spec["received"])

    async def server_got(length: int) -> bytes:
        for _ in range(TIMEOUT * 20):
            got = received.read_bytes() if received.exists() else b""
            if len(got) >= length:
                return got
            await asyncio.sleep(0.05)
        return received.read_bytes() if received.exists() else b""

    out: dict = {}
    reader, writer = await asyncio.open_connection(spec["host"], spec["port"])
    try:
        await play_client(reader, writer, parts["prefix"] + parts["first"])
        for _, m in parts["clean"]:
            writer.write(m)
        last = len(parts["clean"]) - 1
        acks = await asyncio.wait_for(reader.readuntil(f"ACK {300 + last}\r\n".encode()), TIMEOUT)
        out["acks_ok"] = acks == b"".join(f"ACK {300 + i}\r\n".encode() for i in range(len(parts["clean"])))
        expected = client_bytes(parts["prefix"] + parts["first"] + parts["clean"])
        out["clean_arrived_identical"] = await server_got(len(expected)) == expected
        await play_client(reader, writer, parts["second"])
        for _, m in parts["eicar"]:
            writer.write(m)
        back = b""
        while b"eicar.com" not in back:
            back += await asyncio.wait_for(reader.read(65536), TIMEOUT)
        commands = CommandDecoder().feed(back)
        out["bye"] = any(c.verb == "MSG" and b"BYE MSNMSGR:" in (c.payload or b"") for c in commands)
        out["notice"] = any(c.args[:1] == ("imguard",) and b"eicar.com" in (c.payload or b"") for c in commands)
        sentinel = client_bytes(parts["sentinel"])
        writer.write(sentinel)
        expected += client_bytes(parts["second"]) + sentinel
        got = await server_got(len(expected))
        out["server_got_exactly_up_to_the_sentinel"] = got == expected
        out["eicar_reached_server"] = b"EICAR" in got
    finally:
        writer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.peers.netns")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("echo-server")
    p.add_argument("ports", type=int, nargs="+")
    p = sub.add_parser("echo-client")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("size", type=int)
    p = sub.add_parser("connect")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("timeout", type=float)
    p = sub.add_parser("flood")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("connections", type=int)
    p.add_argument("size", type=int)
    p.add_argument("hold", type=float)
    p.add_argument("--wait-greeting", action="store_true")
    for name in ("xmpp-scenario", "irc-dcc-scenario", "msn-server", "msnslp-scenario", "sip-scenario",
                 "matrix-scenario"):
        p = sub.add_parser(name)
        p.add_argument("spec", help="JSON")
    args = parser.parse_args(argv)
    if args.cmd == "echo-server":
        _echo_server(args.ports)
        return 0
    if args.cmd == "echo-client":
        print(json.dumps(_echo_client(args.host, args.port, args.size)))
        return 0
    if args.cmd == "connect":
        import socket
        try:
            with socket.create_connection((args.host, args.port), timeout=args.timeout):
                print(json.dumps({"connected": True}))
        except OSError as e:
            print(json.dumps({"connected": False, "error": repr(e)}))
        return 0
    if args.cmd == "sip-scenario":
        print(json.dumps(_sip_scenario(json.loads(args.spec))))
        return 0
    if args.cmd == "irc-dcc-scenario":
        print(json.dumps(_irc_dcc_scenario(json.loads(args.spec))))
        return 0
    import asyncio
    if args.cmd == "msn-server":
        asyncio.run(_msn_server(json.loads(args.spec)))
        return 0
    if args.cmd == "msnslp-scenario":
        print(json.dumps(asyncio.run(_msnslp_scenario(json.loads(args.spec)))))
        return 0
    if args.cmd == "matrix-scenario":
        print(json.dumps(asyncio.run(_matrix_scenario(json.loads(args.spec)))))
        return 0
    if args.cmd == "flood":
        print(json.dumps(asyncio.run(_flood(args.host, args.port, args.connections, args.size, args.hold,
                                               args.wait_greeting))))
        return 0
    print(json.dumps(asyncio.run(_xmpp_scenario(json.loads(args.spec)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
