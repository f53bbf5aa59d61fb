"""The real `imguard run` as a subprocess in reverse-proxy mode in front of HTTP(S) chat servers (a real Synapse,
or a local server that replays a vendor API), with the bundled rules, the test rules and any extra rule files.

    gw = HttpGateway.start(workdir, ["http://127.0.0.1:8008"], extra_rules={"95-mask.yaml": "..."})
    gw.ports[0]                          # where clients connect (plain HTTP or TLS with imguard's CA: gw.ca_file)
    await gw.wait_alert(lambda e: ...)   # the alert log, as tests/peers/gateway.py reads it
    gw.stop()
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.peers.gateway import ImguardRun
from tests.peers.prosody import PeerError, free_ports, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"


@dataclass
class HttpGateway(ImguardRun):
    directory: Path
    ports: list[int]
    command: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    stopped: bool = False

    @classmethod
    def start(cls, directory: Path, upstreams: list[str], extra_rules: dict[str, str] | None = None,
              extra: list[str] | None = None, timeout: float = 30.0) -> "HttpGateway":
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        gw = cls(directory, free_ports(len(upstreams)))
        gw.data_dir.mkdir(parents=True, exist_ok=True)
        rules = directory / "rules"
        rules.mkdir(exist_ok=True)
        for source in (ROOT / "rules", ROOT / "tests" / "data" / "rules"):
            for path in sorted(source.glob("*.yaml")):
                shutil.copy(path, rules / path.name)
        for name, text in (extra_rules or {}).items():
            (rules / name).write_text(text)
        gw.command = [str(PYTHON), "-m", "imguard", "run", "--listen-host", "127.0.0.1",
                      *[a for up, port in zip(upstreams, gw.ports, strict=True)
                        for a in ("--mode", f"reverse:{up}@{port}")],
                      "--data-dir", str(gw.data_dir), "--rules", str(rules),
                      "--signatures", str(ROOT / "signatures"), *(extra or [])]
        out = open(directory / "imguard.log", "wb")
        gw.process = subprocess.Popen(gw.command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=directory,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out.close()
        try:
            for port in gw.ports:
                wait_for_port(port, timeout, gw.process, what="imguard run")
            result = subprocess.run([str(PYTHON), "-m", "imguard", "ca", "--data-dir", str(gw.data_dir),
                                     "--export", str(gw.ca_file)], capture_output=True, timeout=30)
            if result.returncode != 0:
                raise PeerError(f"imguard ca --export failed: {result.stderr.decode()}")
        except BaseException as e:
            gw.stop()
            raise PeerError(f"imguard run did not start: {' '.join(gw.command)}\n{gw.logs()}") from e
        return gw
