"""One imguard worker against two, behind the kernel's round-robin redirect (nftables `numgen inc mod N`).

    .venv/bin/python bench/bench_workers.py [--connections 16] [--messages 2000] [--runs 3]     (root)

The inline topology of tests/peers/netns.py (client / gateway / server namespaces), with the rule file admins
deploy (deploy/nftables/imguard.nft) redirecting IRC (6667) to 1 or 2 `imguard run --mode transparent@PORT`
workers that share ONE data folder (alerts.jsonl appended with O_APPEND by both, archive.sqlite3 in WAL mode).
Load: --connections IRC clients in the client namespace each send --messages PRIVMSG lines to a sink IRC server
in the server namespace; every line is decoded by imguard's IrcSession, decided by the bundled policy and
recorded (alerts.jsonl + archive). Runs alternate between 1 and 2 workers (each on freshly started workers).
Reported: messages/s end to end (median of --runs), CPU seconds each worker used (summed over the runs), and a
check of the shared data folder afterwards: every alerts line is whole JSON, and the archive holds one row per
message.
Not a test: it asserts nothing, prints a table (and JSON with --json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IRC_PORT = 6667


# --- helpers run inside the namespaces ----------------------------------------------------------------------

async def sink() -> None:
    """A minimal IRC server: welcomes, counts PRIVMSG #bench lines, answers `PRIVMSG #done` with the count."""
    async def handle(reader, writer):
        count = 0
        writer.write(b":sink 001 bench :welcome\r\n")
        buf = b""
        try:
            while data := await reader.read(65536):
                buf += data
                *lines, buf = buf.split(b"\r\n")
                for line in lines:
                    if line.startswith(b"PRIVMSG #bench"):
                        count += 1
                    elif line.startswith(b"PRIVMSG #done"):
                        writer.write(b":sink NOTICE bench :got %d\r\n" % count)
                        await writer.drain()
        except ConnectionError:
            pass
        writer.close()
    server = await asyncio.start_server(handle, "0.0.0.0", IRC_PORT, backlog=256)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


async def load(host: str, connections: int, messages: int) -> dict:
    async def one(i: int) -> tuple[float, int]:
        reader, writer = await asyncio.open_connection(host, IRC_PORT)
        writer.write(f"NICK bench{i}\r\nUSER bench{i} 0 * :bench\r\n".encode())
        await reader.readline()                 # 001
        await start.wait()
        t0 = time.perf_counter()
        for base in range(0, messages, 200):
            writer.write(b"".join(b"PRIVMSG #bench :message %d from bench%d, nothing secret here\r\n" % (n, i)
                                  for n in range(base, min(messages, base + 200))))
            await writer.drain()
        writer.write(b"PRIVMSG #done :end\r\n")
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line or b"NOTICE" in line:
                break
        writer.close()
        got = int(line.rsplit(b" ", 1)[-1]) if line else -1
        return time.perf_counter() - t0, got

    start = asyncio.Event()
    tasks = [asyncio.create_task(one(i)) for i in range(connections)]
    await asyncio.sleep(1.0)                    # every connection registered before the clock starts
    t0 = time.perf_counter()
    start.set()
    results = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    delivered = sum(r[1] for r in results)
    return {"elapsed": elapsed, "delivered": delivered, "sent": connections * messages,
            "rate": delivered / elapsed}


# --- the driver (root namespace) ---------------------------------------------------------------------------------

def shared_folder_check(data: Path) -> dict:
    lines = []                              # alerts.jsonl and its rotations (jsonl_max_bytes)
    for path in sorted(data.glob("alerts.jsonl*")):
        lines += path.read_bytes().splitlines()
    torn = 0
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            torn += 1
    rows = -1
    if (data / "archive.sqlite3").exists():
        with sqlite3.connect(data / "archive.sqlite3") as db:
            rows = db.execute("SELECT count(*) FROM records").fetchone()[0]
    return {"alert_lines": len(lines), "torn_lines": torn, "archive_rows": rows}


def run_config(net, config: str, args, directory: Path, runs: int) -> dict:
    """config "1" / "2": that many workers sharing one data folder; "2s": two workers, a data folder each."""
    from tests.peers.netns import GW_CLIENT_IP, SERVER_IP
    from tests.peers.prosody import stop_process
    workers, separate = int(config.rstrip("s")), config.endswith("s")
    ports = [8081 + i for i in range(workers)]
    folders = [directory / f"data-{config}-{port if separate else 'shared'}" for port in ports]
    for data in set(folders):
        data.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "imguard", "ca", "--data-dir", str(data)], capture_output=True,
                       check=True)
    net.redirect("nft", [IRC_PORT], ports, exclude=["192.0.2.0/24"])
    procs = []
    try:
        for port, data in zip(ports, folders, strict=True):
            log = directory / f"imguard-{config}-{port}.log"
            procs.append((net.popen("gateway", [sys.executable, "-m", "imguard", "run", "--log-level", "WARNING",
                                                "--mode", f"transparent@{port}", "--listen-host", GW_CLIENT_IP,
                                                "--data-dir", data, "--reload-interval", "0"], log), log))
        for proc, log in procs:
            deadline = time.monotonic() + 30
            while b"imguard gateway running" not in (log.read_bytes() if log.exists() else b""):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"imguard did not start:\n{log.read_text()}")
                time.sleep(0.1)
        rates = []
        for _ in range(runs):
            out = net.python("client", ["load", SERVER_IP, args.connections, args.messages], timeout=600,
                             module="bench.bench_workers")
            if out["delivered"] != out["sent"]:
                print(f"  warning: {out['delivered']} of {out['sent']} messages delivered", file=sys.stderr)
            rates.append(out["rate"])
        cpu = []
        for proc, _ in procs:
            stat = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu.append((int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"))
    finally:
        for proc, _ in procs:
            stop_process(proc)
    checks = [shared_folder_check(data) for data in sorted(set(folders))]
    check = {k: sum(c[k] for c in checks) for k in checks[0]}
    return {"workers": config, "rates": rates, "median": statistics.median(rates), "cpu_seconds": cpu, **check}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--messages", type=int, default=2000, help="per connection and run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--configs", default="1,2", help="comma-separated: 1, 2 (workers sharing one data folder), "
                                                       "2s (two workers, a data folder each)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("helper", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.helper and args.helper[0] == "sink":
        asyncio.run(sink())
        return 0
    if args.helper and args.helper[0] == "load":
        host, conns, msgs = args.helper[1], int(args.helper[2]), int(args.helper[3])
        print(json.dumps(asyncio.run(load(host, conns, msgs))))
        return 0

    from tests.peers import netns
    netns.preflight()
    directory = Path(tempfile.mkdtemp(prefix="imguard-bench-workers-"))
    results = []
    with netns.Topology.create() as net:
        sink_proc = net.popen("server", [sys.executable, str(Path(__file__).resolve()), "sink"], directory / "sink.log")
        time.sleep(1.0)
        try:
            # Interleaved (1, 2, 1, 2, ...), each run on freshly started workers, so a change in the machine's
            # load during the benchmark hits both configurations alike.
            runs: dict[str, list[dict]] = {config: [] for config in args.configs.split(",")}
            for _ in range(args.runs):
                for config in runs:
                    runs[config].append(run_config(net, config, args, directory, runs=1))
            for _workers, parts in runs.items():
                rates = [r for part in parts for r in part["rates"]]
                cpu = [sum(x) for x in zip(*(part["cpu_seconds"] for part in parts), strict=True)]
                results.append({**parts[-1], "rates": rates, "median": statistics.median(rates), "cpu_seconds": cpu})
        finally:
            from tests.peers.prosody import stop_process
            stop_process(sink_proc)
    total = args.connections * args.messages
    print(f"imguard workers behind nftables numgen: {args.connections} IRC connections x {args.messages} messages "
          f"({total} per run), {os.cpu_count()} CPUs, median of {args.runs} runs")
    print(f"{'config':>8} {'msg/s (median)':>15} {'runs':>28} {'CPU s/worker':>16} {'alerts lines':>13} "
          f"{'torn':>5} {'archive rows':>13}")
    for r in results:
        runs = ", ".join(f"{x:.0f}" for x in r["rates"])
        cpu = "/".join(f"{c:.1f}" for c in r["cpu_seconds"])
        print(f"{r['workers']:>8} {r['median']:>15.0f} {runs:>28} {cpu:>16} {r['alert_lines']:>13} "
              f"{r['torn_lines']:>5} {r['archive_rows']:>13}")
    for r in results[1:]:
        print(f"speed-up {r['workers']} / {results[0]['workers']}: {r['median'] / results[0]['median']:.2f}x")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
