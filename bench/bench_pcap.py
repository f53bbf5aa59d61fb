"""`imguard pcap` against tshark on the same capture, in one run: megabytes of capture per second and
the peak memory of `imguard pcap` on a capture of a few hundred megabytes.

    .venv/bin/python bench/bench_pcap.py [--mb 300] [--keep FILE]

The capture is built here, deterministically: IRC sessions with chat lines and DCC SEND offers, each
followed by its DCC data connection carrying a few megabytes in 1448-byte segments with 4-byte ACKs
(the shape of Zeek's irc-dcc-send.pcapng, many times over). Printed: the time and MB/s of
  - tshark -r FILE -q -z conv,tcp   (Debian's tshark: reads and dissects every frame, lists conversations)
  - imguard's reader and TCP reassembly alone, in this process
  - imguard pcap FILE --json        (a subprocess: reading, reassembly, IRC and DCC sessions, inspection
                                     of every transferred file, policy), with its peak RSS
and the ratios of imguard's figures to tshark's. The last two are measured with each capture reader
(`--reader scapy`: scapy's RawPcapReader, the default; `--reader struct`: imguard's own), alternating,
--rounds times each (best of the rounds), and the ratio scapy / struct of the whole `imguard pcap` is
printed, in wall time and in CPU time (the subprocess's user + system time, which other load on a shared
machine disturbs less): the issue's bar for keeping scapy's reader is at most 1.10.
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ACK, PSH, SYN, FIN = 0x10, 0x08, 0x02, 0x01


def _checksum_free_ipv4(src: bytes, dst: bytes, payload: bytes) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, 6, 0, src, dst) + payload


def _frame(src, dst, sport, dport, seq, ack, flags, payload=b"") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, 65535, 0, 0)
    ip = _checksum_free_ipv4(src, dst, tcp + payload)
    return b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\x08\x00" + ip


class Writer:
    def __init__(self, f):
        self.f, self.t, self.bytes = f, 1_700_000_000.0, 0
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))

    def packet(self, frame: bytes) -> None:
        self.t += 0.0001
        sec = int(self.t)
        self.f.write(struct.pack("<IIII", sec, int((self.t - sec) * 1e6), len(frame), len(frame)) + frame)
        self.bytes += len(frame) + 16


def _session(w: Writer, rnd: random.Random, n: int, file_bytes: int) -> None:
    client, server = bytes([10, 1, n >> 8 & 255, n & 255]), bytes([10, 2, 0, 1])
    receiver = bytes([10, 3, n >> 8 & 255, n & 255])
    cport, dcc_port = 40000 + n % 20000, 50000 + n % 10000
    cs, ss = rnd.randrange(1 << 32), rnd.randrange(1 << 32)
    w.packet(_frame(client, server, cport, 6667, cs, 0, SYN))
    w.packet(_frame(server, client, 6667, cport, ss, cs + 1, SYN | ACK))
    cs, ss = cs + 1, ss + 1
    lines = [f"NICK user{n}\r\nUSER user{n} 0 * :User {n}\r\n".encode(),
             f"JOIN #team\r\nPRIVMSG #team :good morning from {n}\r\n".encode()]
    lines += [f"PRIVMSG #team :status line {i} of session {n}\r\n".encode() for i in range(20)]
    size = file_bytes
    ip = int.from_bytes(client, "big")
    lines.append(f"PRIVMSG peer{n} :\x01DCC SEND report{n}.bin {ip} {dcc_port} {size}\x01\r\n".encode())
    for line in lines:
        w.packet(_frame(client, server, cport, 6667, cs, ss, ACK | PSH, line))
        cs += len(line)
    # the DCC data connection: the receiver connects to the sender's listener
    rs, ds = rnd.randrange(1 << 32), rnd.randrange(1 << 32)
    w.packet(_frame(receiver, client, 45000 + n % 10000, dcc_port, rs, 0, SYN))
    w.packet(_frame(client, receiver, dcc_port, 45000 + n % 10000, ds, rs + 1, SYN | ACK))
    rs, ds = rs + 1, ds + 1
    block = rnd.randbytes(65536)
    sent = 0
    while sent < size:
        chunk = block[sent % 65536:][:1448] or block[:1448]
        chunk = chunk[:size - sent]
        w.packet(_frame(client, receiver, dcc_port, 45000 + n % 10000, ds, rs, ACK | PSH, chunk))
        ds += len(chunk)
        sent += len(chunk)
        if sent % (1448 * 8) == 0 or sent == size:
            w.packet(_frame(receiver, client, 45000 + n % 10000, dcc_port, rs, ds, ACK | PSH,
                            struct.pack("!I", sent & 0xFFFFFFFF)))
            rs += 4
    w.packet(_frame(client, receiver, dcc_port, 45000 + n % 10000, ds, rs, FIN | ACK))
    w.packet(_frame(client, server, cport, 6667, cs, ss, FIN | ACK))


def build(path: Path, megabytes: int) -> int:
    rnd = random.Random(1234)
    with open(path, "wb") as f:
        w = Writer(f)
        n = 0
        while w.bytes < megabytes * 1024 * 1024:
            _session(w, rnd, n, 3 * 1024 * 1024)
            n += 1
    return n


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str]) -> tuple[float, int, str, float]:
    """(wall seconds, peak RSS in KiB, stdout, CPU seconds) of one subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cpu = _children_cpu()
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    cpu = _children_cpu() - cpu
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if result.returncode not in (0, 1):
        raise SystemExit(f"{cmd[0]} failed ({result.returncode}): {result.stderr[-2000:]}")
    return elapsed, max(peak, before), result.stdout, cpu


def reader_only(path: Path, reader: str) -> tuple[float, int]:
    from imguard.replay.pcapfile import Capture, CaptureLimits
    from imguard.replay.reassembly import Reassembler
    start = time.perf_counter()
    capture = Capture.open(path, CaptureLimits(reader=reader))
    reassembler = Reassembler()
    events = 0
    for segment in capture.tcp_segments():
        events += len(reassembler.feed(segment))
    events += len(reassembler.finish())
    return time.perf_counter() - start, events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=300, help="capture size in MiB (default 300)")
    parser.add_argument("--keep", type=Path, help="keep the capture at this path")
    parser.add_argument("--rounds", type=int, default=3, help="runs per reader, alternating (default 3)")
    args = parser.parse_args()
    tshark = shutil.which("tshark")
    if tshark is None:
        raise SystemExit("tshark is not installed (tools/setup.sh test installs it)")
    work = Path(tempfile.mkdtemp(prefix="imguard-bench-pcap-"))
    path = args.keep or work / "bench.pcap"
    sessions = build(path, args.mb)
    size = path.stat().st_size
    mb = size / 1e6
    print(f"capture: {path} {mb:.1f} MB, {sessions} IRC sessions each with a 3 MiB DCC transfer")

    t_tshark, _, _, _ = timed([tshark, "-r", str(path), "-q", "-z", "conv,tcp"])
    import json
    readers = ("struct", "scapy")
    t_reader = {r: float("inf") for r in readers}
    t_pcap = {r: float("inf") for r in readers}
    cpu_pcap = {r: float("inf") for r in readers}
    rss_kb = events = 0
    for _ in range(args.rounds):
        for reader in readers:
            elapsed, events = reader_only(path, reader)
            t_reader[reader] = min(t_reader[reader], elapsed)
            elapsed, rss, out, cpu = timed([sys.executable, "-m", "imguard", "pcap", str(path), "--json",
                                            "--reader", reader, "--data-dir", str(work / "data")])
            t_pcap[reader] = min(t_pcap[reader], elapsed)
            cpu_pcap[reader] = min(cpu_pcap[reader], cpu)
            rss_kb = max(rss_kb, rss)
            summary = json.loads(out.splitlines()[0])
            transfers = len(summary.get("transfers", []))
            if transfers != sessions:
                raise SystemExit(f"imguard pcap --reader {reader} found {transfers} transfers, the capture "
                                 f"carries {sessions}")
    print(f"{'':40} {'seconds':>8} {'MB/s':>8} {'vs tshark':>10}")
    print(f"{'tshark -q -z conv,tcp':40} {t_tshark:8.2f} {mb / t_tshark:8.1f} {1.0:10.2f}")
    for reader in readers:
        t = t_reader[reader]
        print(f"{'imguard reader + reassembly, ' + reader:40} {t:8.2f} {mb / t:8.1f} {t_tshark / t:10.2f}")
    for reader in readers:
        t = t_pcap[reader]
        print(f"{'imguard pcap (whole pipeline), ' + reader:40} {t:8.2f} {mb / t:8.1f} {t_tshark / t:10.2f}")
    print(f"imguard pcap CPU seconds (best of {args.rounds}): struct {cpu_pcap['struct']:.2f}, scapy "
          f"{cpu_pcap['scapy']:.2f}")
    print(f"scapy / struct: reader + reassembly {t_reader['scapy'] / t_reader['struct']:.3f}, whole imguard pcap "
          f"{t_pcap['scapy'] / t_pcap['struct']:.3f} wall, {cpu_pcap['scapy'] / cpu_pcap['struct']:.3f} CPU "
          "(bar: 1.10)")
    print(f"imguard pcap peak RSS: {rss_kb / 1024:.0f} MiB for a {mb:.0f} MB capture ({events} stream events)")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
