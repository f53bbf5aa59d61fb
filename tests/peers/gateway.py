"""The real `imguard run`, started as a subprocess in front of a test Prosody.

    gw = Gateway.start(workdir, prosody)
    gw.endpoint(STARTTLS)      # where a client connects, with imguard's CA to verify the gateway
    await gw.wait_alert(lambda event: ...)
    gw.stop()

Modes (see `imguard run --help`): reverse TCP in front of Prosody's STARTTLS c2s port and its
direct-TLS port, an explicit HTTP proxy listener (the clients' HTTP), a SOCKS5 listener that
relays XEP-0065 bytestreams to Prosody's proxy65, and (`upload_relay`) a reverse HTTP listener in
front of Prosody's XEP-0363 upload service with `--xmpp-upload-relay` naming it: the chat arrives
on a reverse listener, so imguard rewrites the slots' PUT URLs to that relay (else it refuses them).
The gateway verifies Prosody's certificate with the test CA (an upstream CA setting), and the
clients verify the gateway with imguard's own CA.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tests.peers.prosody import PeerError, Prosody, free_ports, stop_process, wait_for_port
from tests.xmpp_clients import DIRECT_TLS, PLAIN, Endpoint

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"
BUNDLED_RULES = ROOT / "rules"
BUNDLED_SIGNATURES = ROOT / "signatures"
TEST_RULES = ROOT / "tests" / "data" / "rules"


def alert_names_file(event: dict, name: str) -> bool:
    return event.get("file", {}).get("name") == name


class ImguardRun:
    """What every test fixture that runs `imguard run` as a subprocess shares: its folder (`directory`), the
    process, the alert log and imguard's own log. The fixtures (Gateway here, IrcGateway, HttpGateway) add how
    they start it."""

    directory: Path
    process: subprocess.Popen | None
    stopped: bool

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def alerts_file(self) -> Path:
        return self.data_dir / "alerts.jsonl"

    @property
    def ca_file(self) -> Path:
        return self.directory / "imguard-ca.pem"

    @property
    def log_file(self) -> Path:
        return self.directory / "imguard.log"

    # --- the alert log --------------------------------------------------------------------------------

    def alerts(self) -> list[dict]:
        if not self.alerts_file.exists():
            return []
        events = []
        for line in self.alerts_file.read_text(errors="replace").splitlines():
            if line.strip():
                events.append(json.loads(line))
        return events

    def mark(self) -> int:
        """The number of events logged so far: pass it as `since` to look only at later ones."""
        return len(self.alerts())

    async def wait_alert(self, predicate: Callable[[dict], bool], since: int = 0,
                         timeout: float = 10.0) -> dict | None:
        """The first event after the first `since` ones that satisfies `predicate` (None after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.alerts()[since:]:
                if predicate(event):
                    return event
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.1)

    # --- life --------------------------------------------------------------------------------------

    @property
    def crashed(self) -> bool:
        return self.process is not None and self.process.poll() is not None and not self.stopped

    def check_alive(self) -> None:
        if self.crashed:
            raise AssertionError(f"imguard run died (status {self.process.returncode}):\n{self.logs()}")

    def log_size(self) -> int:
        return self.log_file.stat().st_size if self.log_file.exists() else 0

    def errors_since(self, offset: int) -> list[str]:
        """Lines of imguard's own log after byte `offset` that report an error or a traceback (an
        exception mitmproxy caught is still a crash of that connection's handling)."""
        if not self.log_file.exists():
            return []
        with open(self.log_file, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return [line for line in text.splitlines()
                if "Traceback" in line or " ERROR " in line or " CRITICAL " in line]

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.stopped = True
        return stop_process(self.process)

    def logs(self, lines: int = 80) -> str:
        tail = self.log_file.read_text(errors="replace").splitlines()[-lines:] if self.log_file.exists() else []
        return f"--- {self.log_file} (last {len(tail)} lines) ---\n" + "\n".join(tail)


@dataclass
class Gateway(ImguardRun):
    directory: Path
    prosody: Prosody
    c2s_port: int
    tls_port: int
    http_port: int
    socks5_port: int
    upload_relay_port: int = 0          # the reverse listener in front of Prosody's upload service (0: none)
    command: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    stopped: bool = False

    @classmethod
    def start(cls, directory: Path, prosody: Prosody, extra: list[str] | None = None,
              timeout: float = 30.0, test_rules: bool = True, upload_relay: bool = True) -> "Gateway":
        """Start `imguard run` with the bundled rules (plus tests/data/rules when `test_rules`); with
        `upload_relay` (and a server with an upload service), an upload relay in front of it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        c2s, tls, http, socks5, relay = free_ports(5)
        upload_http = getattr(prosody, "http_port", None) if upload_relay else None
        gw = cls(directory, prosody, c2s, tls, http, socks5, relay if upload_http else 0)
        # The clients here fetch links through the proxy listener: links stay as sent (tests/test_upload_relay.py
        # turns their rewriting on, for clients without a proxy).
        relay_args = ["--mode", f"reverse:http://127.0.0.1:{upload_http}@{relay}",
                      "--xmpp-upload-relay", f"http://127.0.0.1:{relay}=http://127.0.0.1:{upload_http}",
                      "--xmpp-upload-relay-links", "never"] if upload_http else []
        gw.data_dir.mkdir(parents=True, exist_ok=True)
        gw.command = [str(PYTHON), "-m", "imguard", "run",
                      "--listen-host", "127.0.0.1",
                      "--mode", f"reverse:tcp://127.0.0.1:{prosody.c2s_port}@{c2s}",
                      "--mode", f"reverse:tcp://127.0.0.1:{prosody.tls_port}@{tls}",
                      "--mode", f"regular@{http}",
                      "--mode", f"socks5@{socks5}",
                      # Prosody's ports are random: say which protocol each one speaks.
                      "--ports", f"{prosody.c2s_port}=xmpp", "--ports", f"{prosody.tls_port}=xmpp+tls",
                      "--bytestream-relay", f"127.0.0.1:{socks5}",
                      "--upstream-ca", str(prosody.ca_file),
                      "--data-dir", str(gw.data_dir),
                      "--rules", str(gw.rules_dir(test_rules)),
                      "--signatures", str(BUNDLED_SIGNATURES),
                      *relay_args, *(extra or [])]
        out = open(directory / "imguard.log", "wb")
        gw.process = subprocess.Popen(gw.command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=directory,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out.close()
        try:
            for port in (c2s, tls, http, socks5, gw.upload_relay_port):
                if port:
                    wait_for_port(port, timeout, gw.process, what="imguard run")
            gw._export_ca()
        except BaseException as e:
            gw.stop()
            raise PeerError(f"imguard run did not start: {' '.join(gw.command)}\n{gw.logs()}") from e
        return gw

    def rules_dir(self, test_rules: bool = True) -> Path:
        """The bundled rules plus the test rules of tests/data/rules (the gateway takes one folder)."""
        target = self.directory / "rules"
        target.mkdir(exist_ok=True)
        for source in (BUNDLED_RULES, TEST_RULES) if test_rules else (BUNDLED_RULES,):
            for path in sorted(source.glob("*.yaml")) if source.is_dir() else ():
                shutil.copy(path, target / path.name)
            if (source / "hashlists").is_dir():         # the hash lists the rules name (rules/hashlists/*.txt)
                shutil.copytree(source / "hashlists", target / "hashlists", dirs_exist_ok=True)
        return target

    def _export_ca(self) -> None:
        result = subprocess.run([str(PYTHON), "-m", "imguard", "ca", "--data-dir", str(self.data_dir),
                                 "--export", str(self.ca_file)], capture_output=True, timeout=30)
        if result.returncode != 0 or b"BEGIN CERTIFICATE" not in self.ca_file.read_bytes():
            raise PeerError(f"`imguard ca --export` failed ({result.returncode}): {result.stderr.decode()}")

    def endpoint(self, mode: str) -> Endpoint:
        """Clients connect to the gateway's reverse listeners and verify imguard's CA; their upload
        PUT/GET goes through its regular (explicit HTTP proxy) listener."""
        port = self.tls_port if mode == DIRECT_TLS else self.c2s_port
        return Endpoint("127.0.0.1", port, mode, ca_file=None if mode == PLAIN else self.ca_file,
                        http_proxy=f"http://127.0.0.1:{self.http_port}")

    def assert_certificate_is_imguards(self, certificate: dict) -> None:
        issuer = str(certificate.get("issuer", ()))
        assert certificate, "the client saw no TLS certificate"
        assert "imguard test peers CA" not in issuer, f"the client talked TLS to Prosody itself: {issuer}"
        assert "imguard" in issuer, f"the gateway's certificate is not from imguard's CA: {issuer}"

