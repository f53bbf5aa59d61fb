"""A real Synapse homeserver (PyPI matrix-synapse, in its own venv .venv-synapse made by `tools/setup.sh test`)
for the Matrix end-to-end tests, started and stopped by the test run.

    with Synapse.start(workdir) as hs:          # config, signing key, SQLite, free port, process
        hs.url, hs.port, hs.server_name, hs.media_store
        hs.stored_media()                        # every file in the media store (what really reached it)

Plain HTTP on 127.0.0.1 (the gateway in front of it terminates the clients' TLS); registration open without
verification, rate limits out of the way, no federation key servers. The process runs in its own session and
is killed with its process group at the end, even after a failure; its log stays in the working directory.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.peers.prosody import PeerError, free_ports, stop_process, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
SYNAPSE_PYTHON = ROOT / ".venv-synapse" / "bin" / "python"
SERVER_NAME = "localhost"

RELAXED = {"per_second": 1000, "burst_count": 1000}

CONFIG = """\
server_name: "{server_name}"
pid_file: {dir}/homeserver.pid
listeners:
  - port: {port}
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: true
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: {dir}/homeserver.db
log_config: "{dir}/log.config"
media_store_path: {dir}/media_store
signing_key_path: "{dir}/signing.key"
registration_shared_secret: "imguard-test-shared-secret"
macaroon_secret_key: "imguard-test-macaroon-secret"
form_secret: "imguard-test-form-secret"
report_stats: false
enable_registration: true
enable_registration_without_verification: true
trusted_key_servers: []
suppress_key_server_warning: true
max_upload_size: 10M
url_preview_enabled: false
enable_media_repo: true
presence:
  enabled: false
rc_message: {relaxed}
rc_registration: {relaxed}
rc_joins:
  local: {relaxed}
  remote: {relaxed}
rc_invites:
  per_room: {relaxed}
  per_user: {relaxed}
rc_login:
  address: {relaxed}
  account: {relaxed}
  failed_attempts: {relaxed}
rc_media_create: {relaxed}
"""

LOG_CONFIG = """\
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: {dir}/homeserver.log
    filters: [context]
filters:
  context:
    (): synapse.logging.context.LoggingContextFilter
    request: ""
loggers:
  synapse.storage.SQL:
    level: WARNING
root:
  level: INFO
  handlers: [file]
disable_existing_loggers: false
"""


@dataclass
class Synapse:
    directory: Path
    port: int
    server_name: str = SERVER_NAME
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def media_store(self) -> Path:
        return self.directory / "media_store"

    @classmethod
    def start(cls, directory: Path, timeout: float = 60.0) -> "Synapse":
        if not SYNAPSE_PYTHON.exists():
            raise PeerError(f"{SYNAPSE_PYTHON} is missing: run `tools/setup.sh test` (it creates .venv-synapse "
                            "with matrix-synapse)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (port,) = free_ports(1)
        server = cls(directory, port)
        config = directory / "homeserver.yaml"
        config.write_text(CONFIG.format(server_name=SERVER_NAME, dir=directory, port=port,
                                        relaxed=json.dumps(RELAXED)))
        (directory / "log.config").write_text(LOG_CONFIG.format(dir=directory))
        keys = subprocess.run([str(SYNAPSE_PYTHON), "-m", "synapse.app.homeserver", "--config-path", str(config),
                               "--generate-keys"], capture_output=True, text=True, timeout=120, cwd=directory)
        if keys.returncode != 0 or not (directory / "signing.key").exists():
            raise PeerError(f"synapse --generate-keys failed ({keys.returncode}):\n{keys.stdout}\n{keys.stderr}")
        out = open(directory / "stdout.log", "wb")
        server.process = subprocess.Popen([str(SYNAPSE_PYTHON), "-m", "synapse.app.homeserver", "--config-path",
                                           str(config)], stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True, cwd=directory)
        out.close()
        try:
            wait_for_port(port, timeout, server.process, what="synapse")
            server._wait_ready(timeout)
        except BaseException as e:
            server.stop()
            raise PeerError(f"synapse did not start:\n{server.logs()}") from e
        return server

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/_matrix/client/versions", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise PeerError("synapse did not answer /_matrix/client/versions")
            time.sleep(0.1)

    def stored_media(self, since: set[Path] | frozenset = frozenset()) -> list[bytes]:
        """The content of every file in the media store (local content, thumbnails), except the files in `since`
        (a media_files() taken earlier: only what was stored after it)."""
        return [p.read_bytes() for p in self.media_files() - set(since)]

    def media_files(self) -> set[Path]:
        return {p for p in self.media_store.rglob("*") if p.is_file()} if self.media_store.exists() else set()

    def stop(self) -> int | None:
        if self.process is None:
            return None
        return stop_process(self.process)

    def logs(self, lines: int = 60) -> str:
        parts = []
        for name in ("stdout.log", "homeserver.log"):
            path = self.directory / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(tail)} lines) ---\n" + "\n".join(tail))
        return "\n".join(parts)

    def __enter__(self) -> "Synapse":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
