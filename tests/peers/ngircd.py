"""A real ngIRCd, and the real `imguard run` in front of it, for the IRC end-to-end tests.

    with NgIrcd.start(workdir) as ircd:             # fresh dir, certificate, config, process
        ircd.port, ircd.tls_port, ircd.ca_file      # cleartext and TLS listeners; the CA that signed its cert
    gw = IrcGateway.start(workdir, ircd)            # reverse:tcp in front of both ports, DCC relay on 127.0.0.1
        gw.port, gw.tls_port, gw.ca_file            # where clients connect; imguard's CA to verify the TLS one
        gw.alerts(), gw.wait_alert(predicate, since), gw.logs()
    gw.stop(); ircd.stop()

ngIRCd (Debian's, `tools/setup.sh test` installs it) runs in the foreground in its own session and is
killed with its process group, even after a failure. Its certificate comes from the same throwaway CA
helper as Prosody's; the gateway verifies it with --upstream-ca, never with verification turned off.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import string
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tests.peers.gateway import ImguardRun
from tests.peers.prosody import (Certificates, PeerError, free_ports, make_certificates, stop_process,
                                 wait_for_port)

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
BUNDLED_RULES = ROOT / "rules"
BUNDLED_SIGNATURES = ROOT / "signatures"
TEST_RULES = ROOT / "tests" / "data" / "rules"
CHANNEL = "#imguard"        # pre-defined in the config: it exists before anyone joins


def _binary() -> str:
    found = shutil.which("ngircd", path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin")
    if found is None:
        raise PeerError("`ngircd` is not installed: run `tools/setup.sh test` (installs Debian's ngircd)")
    return found


@dataclass
class NgIrcd:
    """One running ngIRCd. Build it with NgIrcd.start(); stop() is idempotent."""

    directory: Path
    port: int
    tls_port: int
    certs: Certificates
    process: subprocess.Popen | None = None
    host: str = "127.0.0.1"

    @property
    def ca_file(self) -> Path:
        return self.certs.ca_file

    @property
    def config_file(self) -> Path:
        return self.directory / "ngircd.conf"

    @classmethod
    def start(cls, directory: Path, timeout: float = 20.0) -> "NgIrcd":
        binary = _binary()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        certs = make_certificates(directory / "certs", names=("localhost",))
        port, tls_port = free_ports(2)
        server = cls(directory, port, tls_port, certs)
        template = string.Template((HERE / "ngircd.conf.in").read_text())
        server.config_file.write_text(template.substitute(
            dir=str(directory), port=port, tls_port=tls_port, cert_file=certs.cert_file, key_file=certs.key_file))
        check = subprocess.run([binary, "--configtest", "-f", str(server.config_file)], capture_output=True,
                               text=True, timeout=30)
        if check.returncode != 0:
            raise PeerError(f"ngircd --configtest failed ({check.returncode}):\n{check.stdout}\n{check.stderr}")
        out = open(directory / "ngircd.log", "wb")
        server.process = subprocess.Popen([binary, "-n", "-f", str(server.config_file)], stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                          cwd=directory)
        out.close()
        try:
            for p in (port, tls_port):
                wait_for_port(p, timeout, server.process, what="ngircd")
        except BaseException as e:
            server.stop()
            raise PeerError(f"ngircd did not start:\n{server.logs()}") from e
        return server

    def stop(self) -> int | None:
        if self.process is None:
            return None
        return stop_process(self.process)

    def logs(self, lines: int = 40) -> str:
        path = self.directory / "ngircd.log"
        tail = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
        return f"--- {path} (last {len(tail)} lines) ---\n" + "\n".join(tail)

    def __enter__(self) -> "NgIrcd":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port_range(count: int, host: str = "127.0.0.1", tries: int = 200) -> range:
    """`count` consecutive TCP ports that were all free a moment ago (for --dcc-relay-ports), below the kernel's
    ephemeral range: a port of that range, free when checked, may be given to any outgoing connection before the
    gateway binds it (seen under load: "address already in use")."""
    low = _ephemeral_low()
    for _ in range(tries):
        base = random.randrange(10000, low - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
            return range(base, base + count)
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise PeerError(f"no {count} consecutive free ports found")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (ip_local_port_range), 32768 when it cannot be read."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


@dataclass
class IrcGateway(ImguardRun):
    """The real `imguard run` in front of an NgIrcd: reverse:tcp to its cleartext port and to its TLS port
    (intercepted with imguard's CA), DCC offers rewritten to 127.0.0.1 and a small relay port range."""

    directory: Path
    ircd: NgIrcd
    port: int
    tls_port: int
    dcc_ports: range
    command: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    stopped: bool = False

    @classmethod
    def start(cls, directory: Path, ircd: NgIrcd, extra: list[str] | None = None, timeout: float = 30.0,
              dcc_port_count: int = 8) -> "IrcGateway":
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        port, tls_port = free_ports(2)
        dcc_ports = free_port_range(dcc_port_count)
        gw = cls(directory, ircd, port, tls_port, dcc_ports)
        gw.data_dir.mkdir(parents=True, exist_ok=True)
        rules = directory / "rules"
        rules.mkdir(exist_ok=True)
        for source in (BUNDLED_RULES, TEST_RULES):
            for path in sorted(source.glob("*.yaml")):
                shutil.copy(path, rules / path.name)
        gw.command = [str(PYTHON), "-m", "imguard", "run",
                      "--listen-host", "127.0.0.1",
                      "--mode", f"reverse:tcp://127.0.0.1:{ircd.port}@{port}",
                      "--mode", f"reverse:tcp://127.0.0.1:{ircd.tls_port}@{tls_port}",
                      # ngIRCd's ports are random: say which protocol each one speaks.
                      "--ports", f"{ircd.port}=irc", "--ports", f"{ircd.tls_port}=irc+tls",
                      "--dcc-relay", "127.0.0.1", "--dcc-relay-ports", f"{dcc_ports.start}-{dcc_ports.stop - 1}",
                      "--upstream-ca", str(ircd.ca_file),
                      "--data-dir", str(gw.data_dir),
                      "--rules", str(rules),
                      "--signatures", str(BUNDLED_SIGNATURES),
                      *(extra or [])]
        out = open(gw.log_file, "wb")
        gw.process = subprocess.Popen(gw.command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=directory,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out.close()
        try:
            # Not probed by connecting: a connection to a relay port that no offer announced is an anomaly.
            # The banner is printed once every listener, the relay pool included, is bound.
            gw._wait_for_log("imguard gateway running", timeout)
            for p in (port, tls_port):
                wait_for_port(p, timeout, gw.process, what="imguard run")
            result = subprocess.run([str(PYTHON), "-m", "imguard", "ca", "--data-dir", str(gw.data_dir),
                                     "--export", str(gw.ca_file)], capture_output=True, timeout=30)
            if result.returncode != 0 or b"BEGIN CERTIFICATE" not in gw.ca_file.read_bytes():
                raise PeerError(f"`imguard ca --export` failed ({result.returncode}): {result.stderr.decode()}")
        except BaseException as e:
            gw.stop()
            raise PeerError(f"imguard run did not start: {' '.join(gw.command)}\n{gw.logs()}") from e
        return gw

    def _wait_for_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in (self.log_file.read_text(errors="replace") if self.log_file.exists() else ""):
            if self.process.poll() is not None:
                raise PeerError(f"imguard run exited with status {self.process.returncode} before {text!r}")
            if time.monotonic() > deadline:
                raise PeerError(f"imguard run did not log {text!r} within {timeout:.0f} s")
            time.sleep(0.05)

    # --- the alert log (read synchronously: the IRC tests drive their clients with irc.client's reactor) ---

    def find_alert(self, predicate: Callable[[dict], bool], since: int = 0) -> dict | None:
        for event in self.alerts()[since:]:
            if predicate(event):
                return event
        return None

    def wait_alert(self, predicate: Callable[[dict], bool], since: int = 0, timeout: float = 10.0) -> dict | None:
        """The first event after the first `since` ones that satisfies `predicate` (None after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find_alert(predicate, since)
            if found is not None or time.monotonic() > deadline:
                return found
            time.sleep(0.1)
