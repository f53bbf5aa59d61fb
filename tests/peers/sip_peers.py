"""Real SIP peers for the SIP tests: a Kamailio server and the sipsak client (Debian `kamailio`, `sipsak`).

    server = Kamailio.start(workdir)            # TCP and UDP on one free port, in the foreground
    server.messages()                           # [(from, to, content type, body)] it received
    rc, output = sipsak(raw_request, "127.0.0.1", port, transport="tcp")
    server.stop()

Kamailio runs a 20-line route: MESSAGE -> logged (`IMGUARD-MESSAGE ... body=[...]`) and answered 200; INVITE ->
answered 200 with a fixed SDP answer offering MSRP at msrp://127.0.0.1:<msrp_port>/kam123;tcp (`msrp_port`: where
the test's MSRP receiver listens); anything else 501.
sipsak sends a request read from a file (`-f`, "shoot" mode; it adds its own Via on top) and waits for the
final response: exit status 0 for 2xx, non-zero otherwise; `-vv` prints the response it got. (`sipsak -M`,
its MESSAGE mode, crashes on this Debian 12 build with a NULL dereference after a hostname lookup, so
the shoot mode is used.)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.peers.prosody import PeerError, free_ports

MSRP_SESSION = "kam123"         # the session id of the MSRP path in Kamailio's SDP answer
_SDP = ("v=0\\r\\no=kam 1 1 IN IP4 127.0.0.1\\r\\ns=-\\r\\nc=IN IP4 127.0.0.1\\r\\nt=0 0\\r\\n"
        "m=message {msrp_port} TCP/MSRP *\\r\\na=recvonly\\r\\na=accept-types:*\\r\\n"
        "a=path:msrp://127.0.0.1:{msrp_port}/" + MSRP_SESSION + ";tcp\\r\\n")

CONFIG = """#!KAMAILIO
debug=2
log_stderror=yes
children=1
tcp_children=1
listen=tcp:127.0.0.1:{port}
listen=udp:127.0.0.1:{port}
mpath="{mpath}"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "xlog.so"
loadmodule "textops.so"
request_route {{
    if (is_method("MESSAGE")) {{
        xlog("L_ERR", "IMGUARD-MESSAGE from=[$fu] to=[$tu] ct=[$cT] body=[$rb]\\n");
        sl_send_reply("200", "OK");
        exit;
    }}
    if (is_method("INVITE")) {{
        xlog("L_ERR", "IMGUARD-INVITE from=[$fu] to=[$tu]\\n");
        set_reply_body("{sdp}", "application/sdp");
        sl_send_reply("200", "OK");
        exit;
    }}
    if (is_method("ACK")) {{
        exit;
    }}
    sl_send_reply("501", "Not Implemented");
}}
"""

MODULE_DIRS = ("/usr/lib/x86_64-linux-gnu/kamailio/modules", "/usr/lib/aarch64-linux-gnu/kamailio/modules",
               "/usr/lib/kamailio/modules")
_LOG = re.compile(r"IMGUARD-MESSAGE from=\[(.*?)\] to=\[(.*?)\] ct=\[(.*?)\] body=\[(.*?)\]$", re.S | re.M)


def binary(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin")


class Kamailio:
    def __init__(self, workdir: Path, port: int, process: subprocess.Popen, msrp_port: int = 0):
        self.workdir = workdir
        self.port = port
        self.msrp_port = msrp_port
        self.process = process
        self.log = workdir / "kamailio.log"

    @classmethod
    def start(cls, workdir: Path | None = None, timeout: float = 10.0, msrp_port: int = 2855) -> "Kamailio":
        exe = binary("kamailio")
        if exe is None:
            raise PeerError("kamailio is not installed: tools/setup.sh test installs it (apt: kamailio)")
        mpath = next((d for d in MODULE_DIRS if Path(d, "sl.so").exists()), None)
        if mpath is None:
            raise PeerError("kamailio modules (sl.so) not found")
        workdir = Path(workdir or tempfile.mkdtemp(prefix="imguard-kamailio-"))
        workdir.mkdir(parents=True, exist_ok=True)
        [port] = free_ports(1)
        cfg = workdir / "kamailio.cfg"
        cfg.write_text(CONFIG.format(port=port, mpath=mpath + "/", sdp=_SDP.format(msrp_port=msrp_port)))
        log = open(workdir / "kamailio.log", "wb")
        process = subprocess.Popen([exe, "-f", str(cfg), "-DD", "-E", "-w", str(workdir)], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        server = cls(workdir, port, process, msrp_port)
        deadline = time.monotonic() + timeout
        while "Listening on" not in server.logs() or not server._accepting():
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise PeerError(f"kamailio did not start on port {port}:\n{server.logs()}")
            time.sleep(0.05)
        return server

    def _accepting(self) -> bool:
        import socket
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def messages(self) -> list[tuple[str, str, str, str]]:
        """(from URI, to URI, content type, body) of every MESSAGE Kamailio received, in order."""
        return _LOG.findall(self.logs(full=True))

    def invites(self) -> int:
        return self.logs(full=True).count("IMGUARD-INVITE")

    def logs(self, full: bool = False) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return text if full else text[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)


def sipsak(request: bytes, host: str, port: int, transport: str = "tcp", timeout: float = 15.0,
           workdir: Path | None = None) -> tuple[int, str]:
    """Send `request` with sipsak (shoot mode) and wait for its final response: (exit status, -vv output)."""
    exe = binary("sipsak")
    if exe is None:
        raise PeerError("sipsak is not installed: tools/setup.sh test installs it (apt: sipsak)")
    with tempfile.NamedTemporaryFile("wb", suffix=".sip", dir=workdir, delete=False) as f:
        f.write(request)
        path = f.name
    try:
        # -H: the host name sipsak puts in its Via (no DNS lookup); -D 1: the smallest INVITE timeout factor on
        # UDP, so a lost reply fails fast.
        done = subprocess.run([exe, "-f", path, "-s", f"sip:bob@{host}:{port}", f"--transport={transport}",
                               "-H", "127.0.0.1", "-D", "1", "-vv"], capture_output=True, timeout=timeout)
    finally:
        os.unlink(path)
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")
