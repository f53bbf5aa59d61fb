"""IRC benchmark: lines per second and added latency through imguard, against a direct connection and
against plain mitmproxy relaying the same TCP traffic, in one run.

    .venv/bin/python bench/bench_irc.py [--lines 20000] [--window 200] [--pings 500] [--rounds 3]
    .venv/bin/python bench/bench_irc.py --imguard-arg=--no-jsonl-allowed-messages     # imguard with a setting

The server is a small relay written here (register, then PRIVMSG to a nick is delivered to that nick's
connection with the sender's prefix), because a real ircd throttles a client that sends thousands of lines
a second (ngIRCd's flood protection): the relay is the same on every route, so the ratios measure the
relays. Routes, each started fresh:
    (a) straight to the server,
    (b) plain mitmproxy: `mitmdump --mode reverse:tcp://...` (a TCP relay, no inspection),
    (c) `imguard run` in reverse:tcp mode with the port mapped to irc: every line decoded by IrcSession,
        every PRIVMSG decided by the bundled policy and recorded (alerts.jsonl, archive).
Load: alice sends --lines PRIVMSG lines to bob with at most --window in flight; lines/s is counted at bob, and the
relay process's CPU time per line (user + system, all threads: robust to a busy machine, where lines/s is not).
Latency: --pings lines one at a time, send -> delivery at bob; p50/p99, and what each relay adds to (a).
The routes take turns --rounds times against the same relay processes; each figure is the median of its rounds.
Not a test: prints a table and each figure against its target (issue 21), asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEP_TIMEOUT = 60.0


# --- the server ----------------------------------------------------------------------------------

class RelayServer:
    def __init__(self):
        self.clients: dict[str, asyncio.StreamWriter] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nick = ""
        try:
            while line := await reader.readline():
                if line.startswith(b"NICK "):
                    nick = line[5:].strip().decode()
                    self.clients[nick] = writer
                elif line.startswith(b"USER "):
                    writer.write(f":relay 001 {nick} :welcome\r\n".encode())
                elif line.startswith(b"PRIVMSG "):
                    target, _, text = line[8:].partition(b" ")
                    peer = self.clients.get(target.decode())
                    if peer is not None:
                        peer.write(b":" + nick.encode() + b"!u@h PRIVMSG " + target + b" " + text)
                elif line.startswith(b"PING"):
                    writer.write(b"PONG" + line[4:])
        finally:
            self.clients.pop(nick, None)
            writer.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_port(port: int, process: subprocess.Popen | None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the relay on port {port} exited ({process.returncode})")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


# --- the load ------------------------------------------------------------------------------------

async def client(port: int, nick: str):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\n".encode())
    await asyncio.wait_for(reader.readline(), STEP_TIMEOUT)         # 001
    return reader, writer


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process `pid` so far, all its threads (0 for none: the direct route)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(port: int, lines: int, window: int, pings: int, tag: str, pid: int | None = None) -> dict:
    a_reader, alice = await client(port, f"alice{tag}")
    bob_reader, bob = await client(port, f"bob{tag}")
    received = asyncio.Queue()

    async def bob_reads():
        while await bob_reader.readline():
            received.put_nowait(time.perf_counter())
    reading = asyncio.create_task(bob_reads())
    target = f"bob{tag}".encode()

    # throughput: a window of lines in flight
    cpu_before = cpu_seconds(pid)
    start = time.perf_counter()
    sent = got = 0
    while got < lines:
        while sent < lines and sent - got < window:
            alice.write(b"PRIVMSG " + target + b" :line %d of the benchmark, nothing secret here\r\n" % sent)
            sent += 1
        await alice.drain()
        await asyncio.wait_for(received.get(), STEP_TIMEOUT)
        got += 1
    rate = lines / (time.perf_counter() - start)
    cpu_us = (cpu_seconds(pid) - cpu_before) / lines * 1e6

    # latency: one line at a time
    latencies = []
    for n in range(pings):
        t0 = time.perf_counter()
        alice.write(b"PRIVMSG " + target + b" :ping %d\r\n" % n)
        await alice.drain()
        t1 = await asyncio.wait_for(received.get(), STEP_TIMEOUT)
        latencies.append((t1 - t0) * 1000)
    reading.cancel()
    alice.close()
    bob.close()
    latencies.sort()
    return {"rate": rate, "cpu_us": cpu_us, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]}


# --- the routes ----------------------------------------------------------------------------------

def start_mitmdump(server_port: int, directory: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([str(ROOT / ".venv" / "bin" / "mitmdump"), "-q", "--set", f"confdir={directory}",
                                "--mode", f"reverse:tcp://127.0.0.1:{server_port}@127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, port


def start_imguard(server_port: int, directory: Path, extra: list[str] = ()) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "imguard", "run", "--data-dir", str(directory),
                                "--mode", f"reverse:tcp://127.0.0.1:{server_port}@127.0.0.1:{port}",
                                "--ports", f"{server_port}=irc", "--log-level", "WARNING", *extra],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return process, port


async def main_async(args) -> None:
    relay = RelayServer()
    server = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
    server_port = server.sockets[0].getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="imguard-bench-irc-"))
    routes: list[tuple[str, int, subprocess.Popen | None]] = [("a. direct", server_port, None)]
    try:
        for name, start in (("b. plain mitmproxy", start_mitmdump),
                            ("c. imguard", lambda p, d: start_imguard(p, d, args.imguard_arg))):
            process, port = start(server_port, work / name[0])
            routes.append((name, port, process))
            await wait_port(port, process)
        # The routes take turns: a shared machine's load drifts, and a slow minute then hurts every route alike.
        rounds: dict[str, list[dict]] = {name: [] for name, _, _ in routes}
        for round_no in range(args.rounds):
            for name, port, process in routes:
                r = await measure(port, args.lines, args.window, args.pings, f"{name[0]}{round_no}",
                                  process.pid if process is not None else None)
                rounds[name].append(r)
                print(f"  round {round_no + 1}: {name}: {r['rate']:.0f} lines/s, relay CPU {r['cpu_us']:.1f} us/line",
                      file=sys.stderr)
    finally:
        for _, _, process in routes:
            if process is not None:
                process.terminate()
                process.wait(30)
        server.close()
    rows = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rounds.items()}
    base, mitm, imguard = rows["a. direct"], rows["b. plain mitmproxy"], rows["c. imguard"]
    print("\nIRC PRIVMSG lines alice -> bob on 127.0.0.1 (2 CPUs shared by the server, the relay and the load)")
    print(f"throughput: {args.lines} lines, window {args.window}; latency: {args.pings} lines one at a time; "
          f"median of {args.rounds} alternating rounds\n")
    print(f"{'route':22} {'lines/s':>8} {'vs a':>6} {'vs b':>6} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'+p50 ms':>8} {'+p99 ms':>8} {'relay CPU us/line':>18}")
    for name, r in rows.items():
        cpu = f"{r['cpu_us']:.1f}" if name != "a. direct" else "-"
        print(f"{name:22} {r['rate']:8.0f} {r['rate'] / base['rate']:6.2f} {r['rate'] / mitm['rate']:6.2f} "
              f"{r['p50']:7.2f} {r['p99']:7.2f} {r['p50'] - base['p50']:8.2f} {r['p99'] - base['p99']:8.2f} {cpu:>18}")
    ratio = imguard["rate"] / mitm["rate"]
    print(f"\nc. imguard {'meets' if ratio >= 0.8 else 'MISSES'} the target of at least 0.8 of plain mitmproxy's "
          f"lines/s ({ratio:.2f}); CPU per line {imguard['cpu_us'] / mitm['cpu_us']:.2f}x plain mitmproxy's "
          f"({imguard['cpu_us']:.1f} against {mitm['cpu_us']:.1f} us; every line is decided twice, outbound on "
          "alice's connection and inbound on bob's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--pings", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of every route (medians reported)")
    parser.add_argument("--imguard-arg", action="append", default=[],
                        help="an argument for `imguard run` (repeat for several)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
