"""XMPP benchmark: what imguard costs a chat server's users, against two baselines.

    .venv/bin/python bench/bench_xmpp.py [--messages 5000] [--windows 25,100,400] [--pings 500] [--rounds 3]
                                         [--idle 1000] [--no-idle-tls] [--keep] [--imguard-arg=--SETTING ...]

One run starts a real Prosody (tests/peers/prosody.py) and measures, for the same raw XMPP load,
    (a) straight to Prosody,
    (b) through plain mitmproxy (`mitmdump --mode reverse:tcp://...`: a TCP relay, no inspection),
    (c) through `imguard run` (reverse:tcp in front of the c2s port: every stanza framed, every
        message checked by the bundled policy, written to alerts.jsonl and to the SQLite archive),
    (d) with --reference-decoder: (c) again, its XMPP decoder on the reference path (trees built in Python).
Cleartext c2s with SASL PLAIN keeps TLS out of the comparison. The load client is raw asyncio
streams (slixmpp would be the bottleneck): bench1 sends chat messages to bench2's full JID,
  * throughput: `--messages` messages with at most W in flight, for each W of `--windows`; messages/s
    end to end, and the relay process's CPU time per message (user + system, all threads: robust to a
    busy machine). A few in flight is what chat is: the figure is bound by latency, including the 40 ms
    a delayed ACK can cost a Nagle sender such as Prosody. Hundreds in flight saturate the two CPUs that
    Prosody, the relay and the load client share: the figure is then bound by CPU per message;
  * latency: `--pings` messages one at a time; p50/p99 of send -> delivery, and what each relay adds;
  * memory: `--idle` logged-in, idle connections held open through (b) and (c); the relay's RSS
    before and after, divided by the count (target for imguard: < 50 KB per connection); once in
    cleartext and once with STARTTLS (imguard then holds two TLS connections per chat connection).
It prints a table; it is not a test and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.peers.gateway import Gateway  # noqa: E402
from tests.peers.prosody import Prosody, free_ports, stop_process, wait_for_port  # noqa: E402

DOMAIN = "localhost"
STREAM = (f"<?xml version='1.0'?><stream:stream to='{DOMAIN}' version='1.0' xmlns='jabber:client' "
          "xmlns:stream='http://etherx.jabber.org/streams'>").encode()
MESSAGE_ID = re.compile(rb"<message[^>]*?\sid=[\"']m(\d+)[\"']")
STEP_TIMEOUT = 20.0


# --- a minimal raw XMPP client ------------------------------------------------------------------------

class RawClient:
    """Cleartext c2s: stream, SASL PLAIN, restart, bind. Just enough to send and receive messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, jid: str):
        self.reader, self.writer, self.jid = reader, writer, jid

    @classmethod
    async def login(cls, host: str, port: int, user: str, password: str, resource_name: str,
                    tls: ssl.SSLContext | None = None) -> "RawClient":
        """Log in; with `tls`, upgrade with STARTTLS first (verifying the certificate for DOMAIN)."""
        reader, writer = await asyncio.open_connection(host, port)
        buffer = bytearray()

        async def until(marker: bytes) -> bytes:
            while marker not in buffer:
                chunk = await asyncio.wait_for(reader.read(65536), STEP_TIMEOUT)
                if not chunk:
                    raise ConnectionError(f"{user}: connection closed while waiting for {marker!r}: {bytes(buffer)!r}")
                buffer.extend(chunk)
            end = buffer.index(marker) + len(marker)
            got = bytes(buffer[:end])
            del buffer[:end]
            return got

        writer.write(STREAM)
        await until(b"</stream:features>")
        if tls is not None:
            writer.write(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            answer = await until(b">")
            if b"proceed" not in answer:
                raise ConnectionError(f"{user}: STARTTLS refused: {answer!r}")
            await asyncio.wait_for(writer.start_tls(tls, server_hostname=DOMAIN), STEP_TIMEOUT)
            writer.write(STREAM)
            await until(b"</stream:features>")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        writer.write(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>".encode())
        answer = await until(b">")
        if b"success" not in answer:
            answer += await until(b">")
            if b"success" not in answer:
                raise ConnectionError(f"{user}: SASL PLAIN failed: {answer!r}")
        writer.write(STREAM)
        await until(b"</stream:features>")
        writer.write(f"<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                     f"<resource>{resource_name}</resource></bind></iq>".encode())
        bound = await until(b"</iq>")
        match = re.search(rb"<jid>([^<]+)</jid>", bound)
        if not match:
            raise ConnectionError(f"{user}: bind failed: {bound!r}")
        client = cls(reader, writer, match.group(1).decode())
        client.leftover = bytes(buffer)
        return client

    def close(self) -> None:
        try:
            self.writer.write(b"</stream:stream>")
        except Exception:
            pass
        self.writer.close()


def message(to: str, n: int) -> bytes:
    return (f"<message to='{to}' type='chat' id='m{n}'><body>benchmark message number {n}: "
            f"the quick brown fox jumps over the lazy dog</body></message>").encode()


class Delivery:
    """Reads the receiver's stream and timestamps each message id as it arrives."""

    def __init__(self, client: RawClient):
        self.client = client
        self.arrived: dict[int, float] = {}
        self.event = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        buffer = bytearray(self.client.leftover)
        while True:
            chunk = await self.client.reader.read(262144)
            if not chunk:
                return
            buffer.extend(chunk)
            end = buffer.rfind(b"</message>")
            if end < 0:
                continue
            now = time.perf_counter()
            for m in MESSAGE_ID.finditer(buffer, 0, end):
                self.arrived[int(m.group(1))] = now
            del buffer[:end + len(b"</message>")]
            self.event.set()

    async def wait(self, n: int, timeout: float = STEP_TIMEOUT) -> None:
        deadline = time.perf_counter() + timeout
        while n not in self.arrived:
            self.event.clear()
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise TimeoutError(f"message m{n} did not arrive")
            try:
                await asyncio.wait_for(self.event.wait(), remaining)
            except asyncio.TimeoutError:
                pass


async def pair(host: str, port: int, prosody: Prosody, tag: str) -> tuple[RawClient, RawClient, Delivery]:
    sender = await RawClient.login(host, port, "bench1", prosody.password("bench1"), f"s-{tag}")
    receiver = await RawClient.login(host, port, "bench2", prosody.password("bench2"), f"r-{tag}")
    return sender, receiver, Delivery(receiver)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process `pid` so far (0 for no process: the direct route)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_route(name: str, host: str, port: int, prosody: Prosody, count: int, window: int,
                        pings: int, base: int, relay_pid: int | None = None) -> dict:
    sender, receiver, delivery = await pair(host, port, prosody, name)
    try:
        # warm-up (lazy imports, policy caches, TCP windows)
        for n in range(base, base + 50):
            sender.writer.write(message(receiver.jid, n))
        await delivery.wait(base + 49)
        base += 50
        # latency: one message at a time
        latencies = []
        for n in range(base, base + pings):
            sent = time.perf_counter()
            sender.writer.write(message(receiver.jid, n))
            await delivery.wait(n)
            latencies.append(delivery.arrived[n] - sent)
        base += pings
        # throughput: pipelined, at most `window` in flight
        sent_at: dict[int, float] = {}
        cpu_before = cpu_seconds(relay_pid)
        start = time.perf_counter()
        for n in range(base, base + count):
            if n - window >= base:
                await delivery.wait(n - window)
            sent_at[n] = time.perf_counter()
            sender.writer.write(message(receiver.jid, n))
            if n % window == 0:
                await sender.writer.drain()
        await delivery.wait(base + count - 1, timeout=120)
        elapsed = time.perf_counter() - start
        relay_cpu = cpu_seconds(relay_pid) - cpu_before
        missing = [n for n in sent_at if n not in delivery.arrived]
        loaded = sorted(delivery.arrived[n] - sent_at[n] for n in sent_at if n in delivery.arrived)
        return {"route": name, "rate": count / elapsed, "elapsed": elapsed, "missing": len(missing),
                "cpu_us": relay_cpu / count * 1e6,
                "p50": statistics.median(latencies), "p99": quantile(latencies, 0.99),
                "loaded_p50": quantile(loaded, 0.5), "loaded_p99": quantile(loaded, 0.99), "next": base + count}
    finally:
        delivery.task.cancel()
        sender.close()
        receiver.close()


def median_result(runs: list[dict]) -> dict:
    """Each figure of a route: the median over its rounds."""
    merged = dict(runs[0])
    for key in ("rate", "elapsed", "cpu_us", "p50", "p99", "loaded_p50", "loaded_p99"):
        merged[key] = statistics.median(r[key] for r in runs)
    merged["missing"] = sum(r["missing"] for r in runs)
    merged["rounds"] = len(runs)
    return merged


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- memory -------------------------------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    """Resident set size of `pid` and its children (imguard runs as one process; mitmdump too)."""
    total = 0
    for p in [pid] + children(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def children(pid: int) -> list[int]:
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []
    return kids + [g for k in kids for g in children(k)]


async def measure_idle(name: str, host: str, port: int, pid: int, prosody: Prosody, count: int,
                       tls: ssl.SSLContext | None = None) -> dict:
    """RSS of the relay process before and after `count` logged-in idle connections through it."""
    warm = [await RawClient.login(host, port, "bench1", prosody.password("bench1"), f"warm-{name}-{i}", tls)
            for i in range(20)]
    for c in warm:
        c.close()
    await asyncio.sleep(1.0)
    before = rss_kib(pid)
    clients: list[RawClient] = []
    start = time.perf_counter()
    batch = 50
    for first in range(0, count, batch):
        clients += await asyncio.gather(*[
            RawClient.login(host, port, f"bench{1 + i % 2}", prosody.password(f"bench{1 + i % 2}"),
                            f"idle-{name}-{i}", tls)
            for i in range(first, min(count, first + batch))])
    login_time = time.perf_counter() - start
    await asyncio.sleep(2.0)
    after = rss_kib(pid)
    for c in clients:
        c.close()
    await asyncio.sleep(0.5)
    return {"route": name, "before": before, "after": after, "per_conn": (after - before) / count,
            "count": count, "login_time": login_time}


# --- the relays under test ------------------------------------------------------------------------------

def start_mitmdump(directory: Path, prosody: Prosody) -> tuple[subprocess.Popen, int]:
    (port,) = free_ports(1)
    out = open(directory / "mitmdump.log", "wb")
    process = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "mitmdump"), "-q", "--mode",
         f"reverse:tcp://127.0.0.1:{prosody.c2s_port}@{port}", "--listen-host", "127.0.0.1",
         "--set", f"confdir={directory / 'mitmproxy'}", "--set", "flow_detail=0"],
        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    wait_for_port(port, 30, process, what="mitmdump")
    return process, port


def raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, want)) if hard != resource.RLIM_INFINITY else max(soft, want)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def main_async(args, directory: Path) -> None:
    raise_fd_limit(4 * args.idle + 1024)     # inherited by Prosody, mitmdump and imguard
    prosody = Prosody.start(directory / "prosody", log_level="warn")   # a debug log would be the bottleneck
    relays: list = []       # (process, what) of everything started, stopped at the end

    def fresh_mitmdump(tag: str) -> tuple[subprocess.Popen, int]:
        (directory / tag).mkdir()
        process, port = start_mitmdump(directory / tag, prosody)
        relays.append((process, f"mitmdump ({tag})"))
        return process, port

    def fresh_imguard(tag: str, reference_decoder: bool = False) -> Gateway:
        # Cleartext c2s logs in without the STARTTLS Prosody offers: the fail mode `downgrade` must be open.
        saved = os.environ.get("PYTHONPATH")
        if reference_decoder:      # this gateway's XMPP decoders build their trees in Python (the reference path)
            site = directory / f"{tag}-site"
            site.mkdir()
            (site / "sitecustomize.py").write_text("import imguard.protocols.xmpp.decoder as d\nd.REFERENCE = True\n")
            os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)] + ([saved] if saved else []))
        try:
            gw = Gateway.start(directory / tag, prosody, test_rules=False,
                               extra=["--log-level", "WARNING", "--fail-mode", "xmpp:downgrade=open",
                                      *args.imguard_arg])
        finally:
            if reference_decoder:
                if saved is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = saved
        relays.append((gw.process, f"imguard run ({tag})"))
        return gw

    try:
        mitm, mitm_port = fresh_mitmdump("mitmdump")
        gw = fresh_imguard("imguard")
        routes = [("a. direct to Prosody", prosody.c2s_port, None), ("b. plain mitmproxy", mitm_port, mitm.pid),
                  ("c. imguard", gw.c2s_port, gw.process.pid)]
        if args.reference_decoder:
            ref = fresh_imguard("imguard-reference", reference_decoder=True)
            routes.append(("d. imguard, ref. XML", ref.c2s_port, ref.process.pid))
        # The routes take turns, `--rounds` times for each window: a shared machine's load drifts, and each
        # figure is the median of its rounds, so a slow minute hurts every route alike.
        results: dict[int, list[dict]] = {}
        base = 0
        for window in args.windows:
            rounds: dict[str, list[dict]] = {name: [] for name, _, _ in routes}
            for round_no in range(args.rounds):
                for name, port, pid in routes:
                    r = await measure_route(name, "127.0.0.1", port, prosody, args.messages, window, args.pings,
                                            base, relay_pid=pid)
                    base = r["next"]
                    rounds[name].append(r)
                    print(f"  window {window}, round {round_no + 1}: {name}: {r['rate']:.0f} msg/s, "
                          f"relay CPU {r['cpu_us']:.0f} us/msg", file=sys.stderr)
            results[window] = [median_result(rounds[name]) for name, _, _ in routes]
        memory = []
        if args.idle:
            # Each memory run gets a fresh relay process: RSS never shrinks after connections close,
            # so a second run in the same process would reuse freed memory and look cheaper.
            # TLS: the client verifies Prosody's certificate through the TCP relay (b) and imguard's
            # through imguard (c), which terminates both legs.
            prosody_tls = ssl.create_default_context(cafile=str(prosody.ca_file))
            for name, kind, tls in (("b. plain mitmproxy", "mitmdump", False), ("c. imguard", "imguard", False),
                                    ("b. mitmproxy STARTTLS", "mitmdump", True),
                                    ("c. imguard STARTTLS", "imguard", True)):
                if tls and not args.idle_tls:
                    continue
                tag = f"{kind}-idle-{'tls' if tls else 'plain'}"
                if kind == "mitmdump":
                    process, port = fresh_mitmdump(tag)
                    context = prosody_tls if tls else None
                else:
                    relay = fresh_imguard(tag)
                    process, port = relay.process, relay.c2s_port
                    context = ssl.create_default_context(cafile=str(relay.ca_file)) if tls else None
                memory.append(await measure_idle(name, "127.0.0.1", port, process.pid, prosody, args.idle, context))
                print(f"  measured idle memory through {name}", file=sys.stderr)
        report(args, results, memory)
        for process, what in relays:
            if process.poll() is not None:
                print(f"WARNING: {what} exited during the benchmark (status {process.returncode})")
    finally:
        for process, _ in relays:
            stop_process(process)
        prosody.stop()


def report(args, by_window: dict[int, list[dict]], memory: list[dict]) -> None:
    print()
    print(f"XMPP chat messages, cleartext c2s, bench1 -> bench2 on 127.0.0.1 "
          f"({os.cpu_count()} CPUs; Prosody, relay and load client share them)")
    print(f"throughput: {args.messages} messages with W in flight; latency: {args.pings} messages one at a time; "
          f"median of {args.rounds} alternating rounds")
    verdicts = []
    for window, results in by_window.items():
        print(f"\nW = {window} messages in flight")
        verdicts.append(route_table(window, results))
    print("(+p50/+p99: latency added over route a; vs a / vs b: throughput ratio to routes a and b;")
    print(" relay CPU: the relay process's user+system CPU per message during the throughput run, all its threads)")
    print()
    for line in verdicts:
        print(line)
    if memory:
        print()
        head = (f"{'idle connections':<22} {'count':>6} {'RSS before':>11} {'RSS after':>11} "
                f"{'per conn':>10} {'login s':>8}")
        print(head)
        print("-" * len(head))
        for m in memory:
            print(f"{m['route']:<22} {m['count']:>6} {m['before'] / 1024:>9.1f}MB {m['after'] / 1024:>9.1f}MB "
                  f"{m['per_conn']:>7.1f} KB {m['login_time']:>8.1f}")
        for m in memory:
            if m["route"].startswith("c."):
                verdict = "meets" if m["per_conn"] < 50 else "MISSES"
                print(f"{m['route']} {verdict} the target of < 50 KB per idle connection ({m['per_conn']:.1f} KB)")


def route_table(window: int, results: list[dict]) -> str:
    """Print one window's table; return its verdict line."""
    direct, mitm = results[0], results[1]
    head = (f"{'route':<22} {'msg/s':>8} {'vs a':>6} {'vs b':>6} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'+p50 ms':>8} {'+p99 ms':>8} {'loaded p50/p99 ms':>18} {'relay CPU us/msg':>17} {'lost':>5}")
    print(head)
    print("-" * len(head))
    for r in results:
        cpu = f"{r['cpu_us']:.0f}" if r is not direct else "-"
        print(f"{r['route']:<22} {r['rate']:>8.0f} {r['rate'] / direct['rate']:>6.2f} {r['rate'] / mitm['rate']:>6.2f} "
              f"{r['p50'] * 1e3:>7.2f} {r['p99'] * 1e3:>7.2f} {(r['p50'] - direct['p50']) * 1e3:>8.2f} "
              f"{(r['p99'] - direct['p99']) * 1e3:>8.2f} "
              f"{r['loaded_p50'] * 1e3:>8.1f}/{r['loaded_p99'] * 1e3:<9.1f} {cpu:>17} {r['missing']:>5}")
    imguard = results[2]
    verdict = "meets" if imguard["rate"] >= mitm["rate"] else "MISSES"
    cpu_ratio = imguard["cpu_us"] / mitm["cpu_us"]
    cpu_verdict = "meets" if cpu_ratio <= 2 else "MISSES"
    return (f"W = {window}: c. imguard {verdict} the target of at least plain mitmproxy's throughput "
            f"({imguard['rate'] / mitm['rate']:.2f}x); it {cpu_verdict} the target of at most 2x plain mitmproxy's "
            f"CPU per message ({cpu_ratio:.2f}x: {imguard['cpu_us']:.0f} against {mitm['cpu_us']:.0f} us; every "
            "message is decided twice, on the sender's connection and on the receiver's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000, help="messages in the throughput run")
    parser.add_argument("--windows", type=lambda text: [int(w) for w in text.split(",")], default=[25, 100, 400],
                        help="comma-separated: messages in flight at most, one throughput run per value")
    parser.add_argument("--pings", type=int, default=500, help="messages in the one-at-a-time latency run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of every route (medians reported)")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections for the memory run (0 = skip)")
    parser.add_argument("--no-idle-tls", dest="idle_tls", action="store_false",
                        help="skip the idle-memory run with STARTTLS connections")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs, alerts.jsonl)")
    parser.add_argument("--imguard-arg", action="append", default=[],
                        help="an argument for `imguard run` (repeat for several), e.g. "
                             "--imguard-arg=--no-jsonl-allowed-messages")
    parser.add_argument("--reference-decoder", action="store_true",
                        help="a fourth route: imguard with the XMPP decoder's reference path (element trees built in "
                             "Python callbacks) instead of the C TreeBuilder, to compare the two in one run")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="imguard-bench-"))
    started = time.monotonic()
    try:
        asyncio.run(main_async(args, directory))
    finally:
        if args.keep:
            print(f"files kept in {directory}")
        else:
            import shutil
            shutil.rmtree(directory, ignore_errors=True)
    print(f"(benchmark took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
