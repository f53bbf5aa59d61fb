"""The TCP payloads of one stream of a capture, as tshark reassembles them: what the transcript extractors of
tests/data/*/extract.py share (needs tshark; not run by tests)."""

import subprocess
from pathlib import Path


def segments(pcap: Path, stream: int) -> list[list[str]]:
    """[["c" or "s", payload as latin-1], ...]: "c" from the side that opened the connection."""
    out = subprocess.run(["tshark", "-r", str(pcap), "-q", "-z", f"follow,tcp,raw,{stream}"],
                         capture_output=True, text=True, check=True).stdout
    segs = []
    started = False
    for line in out.splitlines():
        if line.startswith("Node 1:"):
            started = True
            continue
        if not started or not line.strip() or line.startswith("="):
            continue
        side = "s" if line.startswith("\t") else "c"
        segs.append([side, bytes.fromhex(line.strip()).decode("latin-1")])
    return segs
