"""Two gateway hosts sharing one PostgreSQL server (`--transfer-store postgresql://...`, the archive's database):
a side connection lands on the other host than the chat connection that announced it, and is still found,
scanned and decided.

Namespaces made by the test: the client, host A (tests/peers/netns.py's gateway namespace), host B (a fourth
namespace with its own links to the client and the server) and the server (a real Prosody with HTTPS upload and
proxy65). The PostgreSQL server listens on a unix socket both hosts reach (a file, not a network address: no
network leaves the namespaces). The hosts share one CA (docs/deploy.md: copy DATA_DIR/ca) and nothing else on disk.
alice and bob chat through host A; alice's upload PUT crosses host B's HTTP proxy listener and bob fetches through
host A's; bytestream offers are rewritten (by either host) to host B's relay, so the hash host A announced is
looked up on host B. EICAR is blocked with its sender told, a clean file arrives byte-identical, and the blocked
upload's URL learned on host B is refused on host A.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.peers import netns
from tests.peers.netns import (CLIENT_IP, GW_CLIENT_IP, SERVER_IP, NetnsNgircd, NetnsProsody, NetnsUnavailable,
                               Topology, _run)

pytestmark = pytest.mark.timeout(300)

PYTHON = netns.PYTHON
B_CLIENT_IP, CLIENT_B_IP = "10.231.3.1", "10.231.3.2"       # host B <-> client
B_SERVER_IP, SERVER_B_IP = "10.231.4.1", "10.231.4.2"       # host B <-> server
HTTP_PORT, SOCKS5_PORT = 3128, 1080
DCC_PORTS = "20000-20009"       # both hosts write host B's address into offers: host B carries every DCC


def add_host_b(net: Topology) -> str:
    """A second gateway host: its own namespace, linked to the client and to the server namespace."""
    name = f"{net.prefix}-gwb"
    _run(["ip", "netns", "add", name])
    net.names["gateway_b"] = name               # removed with the topology
    _run(["ip", "-n", name, "link", "set", "lo", "up"])
    for end, role, ip, b_end, b_ip in ((f"{net.prefix}c1", "client", CLIENT_B_IP, f"{net.prefix}b0", B_CLIENT_IP),
                                       (f"{net.prefix}s1", "server", SERVER_B_IP, f"{net.prefix}b1", B_SERVER_IP)):
        _run(["ip", "link", "add", end, "type", "veth", "peer", "name", b_end])
        _run(["ip", "link", "set", end, "netns", net.names[role]])
        _run(["ip", "link", "set", b_end, "netns", name])
        _run(["ip", "-n", net.names[role], "addr", "add", f"{ip}/24", "dev", end])
        _run(["ip", "-n", name, "addr", "add", f"{b_ip}/24", "dev", b_end])
        _run(["ip", "-n", net.names[role], "link", "set", end, "up"])
        _run(["ip", "-n", name, "link", "set", b_end, "up"])
    # The chat server's address (SERVER_IP, on its link to host A) through its link to host B.
    _run(["ip", "-n", name, "route", "add", f"{SERVER_IP}/32", "via", SERVER_B_IP])
    # The client's own address (CLIENT_IP, on its link to host A), where a DCC sender listens.
    _run(["ip", "-n", name, "route", "add", f"{CLIENT_IP}/32", "via", CLIENT_B_IP])
    return name


class Host:
    def __init__(self, net: Topology, role: str, directory: Path, listen: str, dsn: str, prosody, ca_from: Path | None):
        self.directory, self.data = directory, directory / "data"
        self.data.mkdir(parents=True)
        if ca_from is not None:
            shutil.copytree(ca_from, self.data / "ca")      # one CA for every host (docs/deploy.md)
        self.log = directory / "imguard.log"
        self.process = net.popen(role, [
            PYTHON, "-m", "imguard", "run", "--listen-host", listen,
            "--mode", f"reverse:tcp://{SERVER_IP}:5222@5222", "--mode", f"regular@{HTTP_PORT}",
            "--xmpp-upload-refuse-unrelayed", "never",    # the clients' HTTP goes through a host's proxy listener
            "--mode", f"socks5@{SOCKS5_PORT}", "--bytestream-relay", f"{B_CLIENT_IP}:{SOCKS5_PORT}",
            "--mode", f"reverse:tcp://{SERVER_IP}:6667@6667",
            "--dcc-relay", B_CLIENT_IP, "--dcc-relay-ports", DCC_PORTS,
            "--upstream-ca", prosody.ca_file, "--data-dir", self.data, "--transfer-store", dsn,
            "--rules", netns.ROOT / "rules", "--signatures", netns.ROOT / "signatures", "--reload-interval", "0"],
            self.log)
        deadline = time.monotonic() + 30
        while b"imguard gateway running" not in (self.log.read_bytes() if self.log.exists() else b""):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"imguard run did not start on {role}:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.1)

    def alerts(self) -> list[dict]:
        path = self.data / "alerts.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def file_action(self, name: str, timeout: float = 5.0) -> str | None:
        """The action of the file event naming `name` (waited for: the receiver may finish before it is written)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.alerts():
                if event.get("file", {}).get("name") == name:
                    return event["event"].get("action")
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def stop(self) -> None:
        from tests.peers.prosody import stop_process
        stop_process(self.process)


@pytest.fixture(scope="module")
def hosts():
    try:
        netns.preflight()
    except NetnsUnavailable as e:
        pytest.skip(f"two gateway hosts need network namespaces: {e}")
    from tests.peers.sink_peers import PostgresServer
    directory = Path(tempfile.mkdtemp(prefix="imguard-two-hosts-"))
    postgres = PostgresServer.start()
    net = Topology.create()
    prosody = ircd = a = b = None
    try:
        add_host_b(net)
        prosody = NetnsProsody.start(net, directory / "prosody")
        ircd = NetnsNgircd.start(net, directory / "ngircd")
        subprocess.run([PYTHON, "-m", "imguard", "ca", "--data-dir", directory / "ca-source"], check=True,
                       capture_output=True)
        ca_dir = directory / "ca-source" / "ca"
        a = Host(net, "gateway", directory / "host-a", GW_CLIENT_IP, postgres.dsn, prosody, ca_dir)
        b = Host(net, "gateway_b", directory / "host-b", B_CLIENT_IP, postgres.dsn, prosody, ca_dir)
        subprocess.run([PYTHON, "-m", "imguard", "ca", "--data-dir", a.data, "--export", directory / "ca.pem"],
                       check=True, capture_output=True)
        yield net, prosody, a, b, directory / "ca.pem"
    finally:
        for process in (b, a, prosody, ircd):
            if process is not None:
                process.stop()
        net.destroy()
        postgres.stop()


EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + b"EICAR-STANDARD-" + b"ANTIVIRUS-TEST-FILE!$H+H*"
CLEAN = b"quarterly numbers, nothing secret\n" * 400 + bytes(range(256)) * 8


def scenario(net: Topology, prosody, ca: Path, files: list[dict]) -> dict:
    spec = {"ca": str(ca), "alice_pw": prosody.accounts["alice"], "bob_pw": prosody.accounts["bob"],
            "files": [{**f, "data_b64": base64.b64encode(f["data"]).decode()} for f in files]}
    for f in spec["files"]:
        f.pop("data")
    return net.python("client", ["scenario", json.dumps(spec)], timeout=120, module="tests.test_gateways_shared")


def test_each_side_path_crosses_to_the_other_gateway_host(hosts):
    """Upload and bytestream, EICAR and a clean file, announced on host A and carried by host B."""
    net, prosody, a, b, ca = hosts
    tag = uuid.uuid4().hex[:6]
    names = {k: f"{k}-{tag}" + (".com" if k.startswith("eicar") else ".bin")
             for k in ("eicar-up", "clean-up", "eicar-s5b", "clean-s5b")}
    out = scenario(net, prosody, ca, [
        {"mechanism": "upload", "name": names["eicar-up"], "data": EICAR, "blocked": True},
        {"mechanism": "upload", "name": names["clean-up"], "data": CLEAN, "blocked": False},
        {"mechanism": "socks5", "name": names["eicar-s5b"], "data": EICAR, "blocked": True},
        {"mechanism": "socks5", "name": names["clean-s5b"], "data": CLEAN, "blocked": False}])
    eicar_up, clean_up, eicar_s5b, clean_s5b = out["files"]
    # EICAR by upload: refused by host B (which never saw the slot), and its URL refused by host A afterwards.
    assert eicar_up["put_status"] == 403, eicar_up
    assert eicar_up["get_status"] == 403 and eicar_up["received_len"] == 0, eicar_up
    assert not eicar_up["link_arrived"], f"the blocked upload's link reached bob through host A: {eicar_up}"
    assert b.file_action(names["eicar-up"]) in ("block", "quarantine"), "host B logged no block for the upload"
    # The clean upload: scanned on host B, fetched through host A byte-identical.
    assert clean_up["put_status"] in (200, 201) and clean_up["received_sha256"] == hashlib.sha256(CLEAN).hexdigest()
    assert b.file_action(names["clean-up"]) in ("allow", "alert"), "host B did not scan the clean upload"
    # Bytestreams: the offer host A rewrote names host B's relay; host B finds host A's hash.
    for seen in (eicar_s5b, clean_s5b):
        assert [B_CLIENT_IP, SOCKS5_PORT] in seen["streamhosts"], seen["streamhosts"]
    assert eicar_s5b["received_len"] == 0 and eicar_s5b["after_arrived"], eicar_s5b
    assert eicar_s5b["notice"], "alice (on host A) was not told about the file host B blocked"
    assert b.file_action(names["eicar-s5b"]) in ("block", "quarantine")
    assert clean_s5b["received_sha256"] == hashlib.sha256(CLEAN).hexdigest(), clean_s5b
    assert b.file_action(names["clean-s5b"]) in ("allow", "alert")
    assert a.process.poll() is None and b.process.poll() is None


def dcc(net: Topology, name: str, data: bytes, blocked: bool) -> dict:
    """alice offers bob a file by DCC SEND over IRC through host A (tests/peers/netns.py's scenario)."""
    return net.python("client", ["irc-dcc-scenario", json.dumps({
        "host": GW_CLIENT_IP, "port": 6667, "name": name, "blocked": blocked,
        "data_b64": base64.b64encode(data).decode()})], timeout=90)


def test_dcc_offered_through_one_host_is_carried_by_the_other(hosts):
    """Host A rewrites the offer to host B's relay port (allocated in the shared table); host B finds host A's
    offer, holds EICAR (bob gets nothing, alice on host A is told, host B logs the block) and relays a clean file
    byte-identical."""
    net, _, a, b, _ = hosts
    tag = uuid.uuid4().hex[:6]
    eicar = dcc(net, f"eicar-dcc-{tag}.com", EICAR, blocked=True)
    assert eicar["offer"] and eicar["offer"]["host"] == B_CLIENT_IP, eicar
    assert eicar["received_len"] == 0 and eicar["sentinel_arrived"], eicar
    assert eicar["notice"], f"alice (on host A) was not told about the DCC host B blocked: {eicar['notices']}"
    assert b.file_action(f"eicar-dcc-{tag}.com") in ("block", "quarantine")
    clean = dcc(net, f"clean-dcc-{tag}.bin", CLEAN, blocked=False)
    assert clean["offer"]["host"] == B_CLIENT_IP and clean["received_sha256"] == clean["sent_sha256"], clean
    assert b.file_action(f"clean-dcc-{tag}.bin") in ("allow", "alert")
    assert a.process.poll() is None and b.process.poll() is None


# --- run inside the client namespace ----------------------------------------------------------------------------

async def _scenario(spec: dict) -> dict:
    from tests.test_e2e_xmpp import transfer
    from tests.xmpp_clients import STARTTLS, Client, Endpoint, error_text
    ca = Path(spec["ca"])
    via_b = Endpoint(GW_CLIENT_IP, 5222, STARTTLS, ca_file=ca, http_proxy=f"http://{B_CLIENT_IP}:{HTTP_PORT}",
                     http_ca_file=ca)
    via_a = Endpoint(GW_CLIENT_IP, 5222, STARTTLS, ca_file=ca, http_proxy=f"http://{GW_CLIENT_IP}:{HTTP_PORT}",
                     http_ca_file=ca)
    tag = uuid.uuid4().hex[:8]
    out: dict = {"files": []}
    async with Client.connected(via_b, f"alice@localhost/a-{tag}", spec["alice_pw"]) as alice, \
            Client.connected(via_a, f"bob@localhost/b-{tag}", spec["bob_pw"]) as bob:
        for item in spec["files"]:
            data = base64.b64decode(item["data_b64"])
            seen = await transfer(None, item["mechanism"], alice, bob, item["name"], data)
            if item["mechanism"] == "socks5" and seen["sender_error"] == "not-allowed":
                # Known race, not this test's subject: the relay (mitmproxy's socks5 mode) answers alice's CONNECT
                # once its TCP connection to proxy65 is up, before it has replayed the CONNECT there, so alice's
                # <activate/> (through host A) can reach Prosody first. Tried once more; reported as `retried`.
                seen = await transfer(None, item["mechanism"], alice, bob, item["name"], data)
                seen["retried"] = True
            received = seen.pop("received")
            seen.pop("proxies", None)
            seen.update(received_sha256=hashlib.sha256(received).hexdigest(), received_len=len(received),
                        streamhosts=bob.received.streamhosts[-2:], notice=False)
            if item["blocked"]:
                seen["notice"] = bool(await alice.wait_for(
                    lambda r, name=item["name"]: [m for m in r.messages if name in (m["body"] or "") + error_text(m)],
                    timeout=5))
            after = f"after {item['name']} {tag}"
            alice.send_chat(bob.jid, after)
            seen["after_arrived"] = (await bob.wait_message(after, timeout=10)) is not None
            out["files"].append(seen)
    return out


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "scenario":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(json.dumps(asyncio.run(_scenario(json.loads(sys.argv[2])))))
