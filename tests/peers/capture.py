"""tcpdump on loopback for the length of a test: what crossed, as a pcap that `imguard pcap` reads.

    with Capture.start(workdir / "run.pcap", "tcp port 5222 or udp port 5060") as capture:
        ...                                  # the end-to-end scenario
    capture.path                             # the pcap, complete once the block has ended
    capture.select(workdir / "leg.pcap", "not tcp port 5222")   # a part of it, by a tcpdump filter

`start` returns once tcpdump is capturing: it sends probe datagrams to a port of its own (added to the filter)
until one is in the file, so nothing the test sends afterwards can be missed; `stop` sends a last probe and waits
until it is in the file, so everything sent before it is in too (the kernel keeps the order on loopback). The
probes are UDP to a port no protocol is mapped to; the replay counts them and decodes nothing. tcpdump writes
classic pcap (`-w`), packet by packet (`-U`), each packet as soon as it is seen (`--immediate-mode`; otherwise
libpcap hands packets over in blocks, up to a second late), whole packets (`-s`), with a kernel ring large enough
for a burst of them (`-B`); then SIGINT ends it. A capture that lost packets (tcpdump's "dropped by kernel") is an
error: a comparison over it would compare nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.peers.prosody import PeerError

PCAP_HEADER = 24        # bytes of the classic pcap file header: more means a packet is in
SNAPLEN = 65536 + 64    # a whole loopback packet (MTU 65536) with its link header
BUFFER_KIB = 64 * 1024  # the kernel ring: in immediate mode each slot is a snap length, so this holds ~1000 packets


def tcpdump() -> str | None:
    return shutil.which("tcpdump")


class Capture:
    """One tcpdump process writing `path` (see the module docstring)."""

    def __init__(self, path: Path, process: subprocess.Popen, log: Path, probe_port: int):
        self.path, self.process, self.log, self.probe_port = path, process, log, probe_port

    @classmethod
    def start(cls, path: Path, bpf: str, interface: str = "lo", timeout: float = 10.0) -> "Capture":
        binary = tcpdump()
        if binary is None:
            raise PeerError("tcpdump is not installed (Debian: tcpdump)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:     # the probes' port: free, and ours
            s.bind(("127.0.0.1", 0))
            probe_port = s.getsockname()[1]
        log = path.with_suffix(".tcpdump.log")
        command = [binary, "-i", interface, "--immediate-mode", "-U", "-s", str(SNAPLEN), "-B", str(BUFFER_KIB), "-n",
                   "-w", str(path),
                   f"({bpf}) or (udp port {probe_port})"]
        with open(log, "wb") as out:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        capture = cls(path, process, log, probe_port)
        try:
            capture._probe(b"imguard capture start", timeout)
        except BaseException:
            capture.stop()
            raise
        return capture

    def _probe(self, marker: bytes, timeout: float) -> None:
        """Send `marker` to the probe port until it is in the file."""
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise PeerError(f"tcpdump exited ({self.process.returncode}): {self.log.read_text()}")
                probe.sendto(marker, ("127.0.0.1", self.probe_port))
                time.sleep(0.05)
                if self.path.exists() and self.path.stat().st_size > PCAP_HEADER and marker in self.path.read_bytes():
                    return
        raise PeerError(f"tcpdump did not capture its probe within {timeout}s: {self.log.read_text()}")

    def stop(self, timeout: float = 10.0) -> Path:
        """Wait until everything sent so far is in the file (a last probe), stop tcpdump, return the pcap's path."""
        if self.process.poll() is None:
            try:
                self._probe(b"imguard capture end", timeout)
            finally:
                os.kill(self.process.pid, signal.SIGINT)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout)
            dropped = re.search(r"(\d+) packets? dropped by kernel", self.log.read_text())
            if dropped and int(dropped.group(1)):
                raise PeerError(f"tcpdump lost {dropped.group(1)} packets (dropped by kernel): {self.log.read_text()}")
        return self.path

    def select(self, out: Path, bpf: str) -> Path:
        """The packets of this capture that match `bpf`, written to `out` (tcpdump -r ... -w ...)."""
        result = subprocess.run([tcpdump() or "tcpdump", "-r", str(self.path), "-w", str(out), bpf],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise PeerError(f"tcpdump could not select {bpf!r} from {self.path}: {result.stderr}")
        return Path(out)

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
