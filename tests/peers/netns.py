"""An inline deployment in miniature: three network namespaces joined by veth pairs, made and removed by the test.

    client  10.231.1.2 ──veth── 10.231.1.1  gateway  10.231.2.1 ──veth── 10.231.2.2  server
            default via .1.1                ip_forward=1                 default via .2.1
                                            chat ports redirected to imguard's transparent listener
                                            (deploy/nftables/imguard.nft or deploy/iptables/imguard-iptables.sh)

    with Topology.create() as net:                # root only; names are unique per run
        net.redirect("nft", chat_ports=[5222], imguard_ports=[8080])
        net.popen("server", [...])                # `ip netns exec <ns> ...`
    # every namespace (and with it every veth, rule and socket) is gone here, even after a failure

The same file is the helper run *inside* the namespaces (`ip netns exec NS python -m tests.peers.netns ...`):

    echo-server PORT...            a TCP echo server that first says who connected (the source address it sees)
    echo-client HOST PORT SIZE     sends SIZE random bytes, prints JSON {peer, sent_sha256, received_sha256}
    connect HOST PORT TIMEOUT      does a TCP connection get through? JSON {connected, error}
    flood HOST PORT N SIZE HOLD    N XMPP connections at once, each an endless stanza of SIZE bytes; JSON outcomes
    xmpp-scenario JSON             slixmpp alice and bob through the gateway: a message, then an IBB file; JSON out
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

    def redirect(self, backend: str, chat_ports: list[int], imguard_ports: list[int],
                 exclude: list[str] = ("192.0.2.0/24",)) -> None:
        """Load deploy/nftables/imguard.nft (only its parameters rewritten) or run
        deploy/iptables/imguard-iptables.sh in the gateway namespace."""
        self.backend = backend
        if backend == "nft":
            self.run("gateway", ["nft", "-f", "-"], input=render_nft(self.lan_if, chat_ports, imguard_ports, exclude))
        elif backend == "iptables":
            self.redirect_env = {"LAN_IF": self.lan_if, "CHAT_PORTS": ",".join(map(str, chat_ports)),
                                 "IMGUARD_PORTS": ",".join(map(str, imguard_ports)), "EXCLUDE": " ".join(exclude)}
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


def render_nft(lan_if: str, chat_ports: list[int], imguard_ports: list[int], exclude: list[str]) -> str:
    """deploy/nftables/imguard.nft with its `define` lines and the worker map set to these values."""
    text = NFT_RULES.read_text()
    values = {"LAN_IF": f'"{lan_if}"', "CHAT_PORTS": "{ " + ", ".join(map(str, chat_ports)) + " }",
              "IMGUARD_PORTS": "{ " + ", ".join(map(str, imguard_ports)) + " }",
              "EXCLUDE": "{ " + ", ".join(exclude) + " }"}
    for name, value in values.items():
        text, n = re.subn(rf"^define {name} = .*$", f"define {name} = {value}", text, flags=re.M)
        assert n == 1, f"{NFT_RULES}: no `define {name}` line"
    workers = ", ".join(f"{i} : {port}" for i, port in enumerate(imguard_ports))
    text, n = re.subn(r"numgen inc mod \d+ map \{[^}]*\}", f"numgen inc mod {len(imguard_ports)} map {{ {workers} }}",
                      text)
    assert n == 1, f"{NFT_RULES}: no numgen redirect line"
    return text


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
https_ports = { }
modules_enabled = { "roster"; "saslauth"; "tls"; "disco"; "ping"; "posix" }
modules_disabled = { "s2s" }
authentication = "internal_plain"
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
c2s_stanza_size_limit = 1024*1024
ssl = { certificate = "$dir/certs/localhost.crt"; key = "$dir/certs/localhost.key" }
VirtualHost "localhost"
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
        certs = make_certificates(directory / "certs", ips=tuple(ips))
        config = directory / "prosody.cfg.lua"
        config.write_text(string.Template(PROSODY_CONFIG).substitute(
            dir=str(directory), interfaces="; ".join(f'"{ip}"' for ip in ips)))
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
    """alice and bob log in at the server's real address; alice sends bob a message, then a file by IBB."""
    from tests.xmpp_clients import Client, Endpoint, error_text
    endpoint = Endpoint(spec["host"], spec["port"], spec.get("mode", "starttls"), ca_file=Path(spec["ca_file"]))
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
        if spec.get("file_b64") is not None:
            import base64
            import hashlib
            data = base64.b64decode(spec["file_b64"])
            result = await alice.ibb_send(bob.jid, data, name=spec["file_name"])
            out["sender_error"] = result.error
            await bob.wait_for(lambda r: result.sid in r.ibb_closed, timeout=5)
            received = bytes(bob.received.ibb.get(result.sid, b""))
            out["received_sha256"] = hashlib.sha256(received).hexdigest()
            out["received_len"] = len(received)
            notices = await alice.wait_for(lambda r: [m for m in r.messages
                                                      if spec["file_name"] in (m["body"] or "") + error_text(m)],
                                           timeout=5)
            out["notice"] = bool(notices)
            after = f"after the file {tag}"
            alice.send_chat(bob.jid, after)
            out["after_arrived"] = (await bob.wait_message(after, timeout=10)) is not None
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
    p = sub.add_parser("xmpp-scenario")
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
    import asyncio
    if args.cmd == "flood":
        print(json.dumps(asyncio.run(_flood(args.host, args.port, args.connections, args.size, args.hold,
                                               args.wait_greeting))))
        return 0
    print(json.dumps(asyncio.run(_xmpp_scenario(json.loads(args.spec)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
