"""Gateway relay cost and memory per idle connection, on loopback.

    .venv/bin/python bench/bench_gateway_relay.py [--mb 100] [--idle 500] [--runs 3] [--rounds 20000]

Runs the gateway in a child process (so its RSS is its own) in reverse:tcp mode in front of a local sink and
measures:
  1. upload throughput of --mb MiB: direct, through the gateway untouched (TCPLayer ignore, no flow), and
     through a SessionLayer carrying RelaySession (every chunk through a session call);
  2. RSS after 10% and after 100% of --rounds 1 KiB round trips on one long-lived connection;
  3. RSS growth of the gateway per idle XMPP connection (a real XmppSession with the bundled rules), after
     each connection sent a stream header.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

XMPP_HEADER = (b"<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' "
               b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- child: the gateway -------------------------------------------------------------------------------------

async def serve(sink_port: int, relay_port: int, data_dir: str, real_pipeline: bool) -> None:
    from imguard.gateway.master import Gateway, default_factories
    from imguard.gateway.settings import GatewaySettings
    from imguard.protocols.base import RelaySession

    if real_pipeline:
        from imguard.runtime import build_pipeline
        pipeline = build_pipeline(data_dir=Path(data_dir))
    else:
        class P:
            def record(self, e): pass
        pipeline = P()
    import socket
    free = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            free.append(sock.getsockname()[1])
    modes = [f"reverse:tcp://127.0.0.1:{sink_port}@127.0.0.1:{free[0]}",
             f"reverse:tcp://127.0.0.1:{relay_port}@127.0.0.1:{free[1]}"]
    s = GatewaySettings(mode=modes, ports=[f"{relay_port}=relay", f"{sink_port}=none"])
    factories = default_factories(pipeline, None, None) if real_pipeline else {}
    factories["relay"] = lambda info: RelaySession()
    if real_pipeline:   # idle test: the sink port speaks XMPP
        s = GatewaySettings(mode=modes[:1], ports=[f"{sink_port}=xmpp"])
    gw = Gateway(s, pipeline, data_dir=Path(data_dir), factories=factories, transfers=None)
    await gw.start()
    print(" ".join(str(addr[1]) for _, addr in gw.listen_addrs), flush=True)
    await gw.wait()


# --- parent ---------------------------------------------------------------------------------------------------

async def sink_server():
    received = []

    async def handle(reader, writer):
        n = 0
        while data := await reader.read(1 << 16):
            n += len(data)
        received.append(n)
        writer.close()
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], received


async def upload(port: int, mib: int) -> float:
    chunk = os.urandom(1 << 16)
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(mib * 16):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    await reader.read()
    writer.close()
    return mib / (time.perf_counter() - t0)


def start_child(sink_port: int, relay_port: int, data_dir: str, real: bool):
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(sink_port), str(relay_port), data_dir,
                             "1" if real else "0"], stdout=subprocess.PIPE, cwd=ROOT)
    ports = [int(p) for p in proc.stdout.readline().split()]
    return proc, ports


async def throughput(mib: int, runs: int, data_dir: str) -> None:
    srv, sink, _ = await sink_server()
    srv2, sink2, _ = await sink_server()
    proc, (untouched, relayed) = start_child(sink, sink2, data_dir, False)
    try:
        results = {"direct": [], "gateway, untouched (no flow)": [], "gateway, RelaySession layer": []}
        for _ in range(runs):     # interleaved
            results["direct"].append(await upload(sink, mib))
            results["gateway, untouched (no flow)"].append(await upload(untouched, mib))
            results["gateway, RelaySession layer"].append(await upload(relayed, mib))
        direct = statistics.median(results["direct"])
        print(f"upload of {mib} MiB, median of {runs}:")
        for name, values in results.items():
            m = statistics.median(values)
            print(f"  {name:32s} {m:8.1f} MiB/s  ({100 * m / direct:5.1f}% of direct)")
    finally:
        proc.terminate()
        proc.wait()
        srv.close(), srv2.close()


async def long_lived(rounds: int, data_dir: str) -> None:
    """One connection, many 1 KiB round trips through a RelaySession layer: RSS must not grow with traffic."""
    async def echo(reader, writer):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()
    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    proc, (_, relayed) = start_child(port, port, data_dir, False)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", relayed)
        msg = os.urandom(1024)
        marks = {}
        t0 = time.perf_counter()
        for i in range(1, rounds + 1):
            writer.write(msg)
            await reader.readexactly(len(msg))
            if i in (rounds // 10, rounds):
                marks[i] = rss_kib(proc.pid)
        rate = rounds / (time.perf_counter() - t0)
        a, b = sorted(marks)
        print(f"{rounds} x 1 KiB round trips on one connection ({rate:.0f}/s): RSS after {a}: {marks[a]} KiB, "
              f"after {b}: {marks[b]} KiB")
        writer.close()
    finally:
        proc.terminate()
        proc.wait()
        srv.close()


async def idle(n: int, data_dir: str) -> None:
    held = []

    async def handle(reader, writer):
        held.append(writer)
        await reader.read()
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    proc, (gport,) = start_child(port, port, data_dir, True)
    try:
        conns = []
        for _ in range(20):                      # warm up imports and caches
            r, w = await asyncio.open_connection("127.0.0.1", gport)
            w.write(XMPP_HEADER)
            conns.append(w)
        await asyncio.sleep(1)
        before = rss_kib(proc.pid)
        for _i in range(n):
            r, w = await asyncio.open_connection("127.0.0.1", gport)
            w.write(XMPP_HEADER)
            conns.append(w)
        while len(held) < n + 20:
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        after = rss_kib(proc.pid)
        print(f"{n} idle XMPP connections (XmppSession, real pipeline): RSS {before} -> {after} KiB, "
              f"{(after - before) / n:.1f} KiB per connection")
        for w in conns:
            w.close()
    finally:
        proc.terminate()
        proc.wait()
        srv.close()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        import logging
        logging.basicConfig(level=logging.WARNING)
        asyncio.run(serve(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"))
        return
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=100)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--idle", type=int, default=500)
    p.add_argument("--rounds", type=int, default=20000)
    p.add_argument("--data-dir", default="/tmp/imguard-bench")
    a = p.parse_args()
    asyncio.run(throughput(a.mb, a.runs, a.data_dir))
    asyncio.run(long_lived(a.rounds, a.data_dir))
    asyncio.run(idle(a.idle, a.data_dir))


if __name__ == "__main__":
    main()
