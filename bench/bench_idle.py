"""Memory per idle intercepted connection: 1,000 XMPP clients logged in through `imguard run` after STARTTLS.

    .venv/bin/python bench/bench_idle.py [--count 1000] [--runs 3] [--breakdown] [--keep]

One run starts a real Prosody (tests/peers/prosody.py) and, for each of `--runs`:
  (c) a fresh `imguard run` in reverse mode in front of Prosody's c2s port: `--count` raw clients each upgrade
      with STARTTLS (imguard terminates TLS on both legs: two TLS connections per chat connection), log in
      with SASL PLAIN, bind and stay idle. The figure is the process's RSS (/proc/PID/status VmRSS) after,
      minus before (after 20 warm-up logins), divided by the count;
  (o) OpenSSL alone, in the same run: a fresh Python process that holds `--count` pairs of pyOpenSSL
      connections like the gateway's (memory BIOs, mitmproxy's own context factories, a forged certificate
      from its CertStore, the buffers and BIOs imguard releases released: tls_memory.py; set
      IMGUARD_BENCH_KEEP_BIOS=1 to keep the handshake's BIOs), each pair handshaken with real peers in this
      process over loopback and one record exchanged each way, then idle. Same measure, and the malloc heap
      it grew by (mallinfo2), step by step.
With --breakdown, one more imguard run under tracemalloc (a sitecustomize on PYTHONPATH; nothing in imguard
changes): the Python allocations the idle connections added, by file and line, and the rest of the RSS growth
(OpenSSL, the allocator). It prints a table with the target (<= 100 KB per connection); it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imguard.gateway.ca import CONF_BASENAME  # noqa: E402
from bench.bench_xmpp import RawClient, raise_fd_limit, rss_kib  # noqa: E402
from tests.peers.gateway import Gateway  # noqa: E402
from tests.peers.prosody import Prosody  # noqa: E402

TARGET_KB = 100
WARM = 20

TRACEMALLOC_SITE = '''
import os, signal, tracemalloc
_out = os.environ["IMGUARD_BENCH_SNAPSHOT"]
tracemalloc.start(int(os.environ.get("IMGUARD_BENCH_FRAMES", "1")))
_n = [0]
def _dump(signum, frame):
    _n[0] += 1
    tracemalloc.take_snapshot().dump(f"{_out}.{_n[0]}")
signal.signal(signal.SIGUSR1, _dump)
'''


# --- (c) imguard ------------------------------------------------------------------------------------------

async def login_many(port: int, prosody: Prosody, count: int, tls: ssl.SSLContext, tag: str) -> list[RawClient]:
    clients: list[RawClient] = []
    for first in range(0, count, 50):
        clients += await asyncio.gather(*[
            RawClient.login("127.0.0.1", port, f"bench{1 + i % 2}", prosody.password(f"bench{1 + i % 2}"),
                            f"{tag}-{i}", tls)
            for i in range(first, min(count, first + 50))])
    return clients


async def measure_imguard(directory: Path, prosody: Prosody, count: int, tag: str,
                          snapshot: Path | None = None) -> dict:
    saved = os.environ.get("PYTHONPATH")
    if snapshot is not None:
        site = directory / f"{tag}-site"
        site.mkdir(parents=True)
        (site / "sitecustomize.py").write_text(TRACEMALLOC_SITE)
        os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)] + ([saved] if saved else []))
        os.environ["IMGUARD_BENCH_SNAPSHOT"] = str(snapshot)
    try:
        gw = Gateway.start(directory / tag, prosody, test_rules=False, upload_relay=False,
                           extra=["--log-level", "WARNING"], timeout=300 if snapshot else 30)
    finally:
        if snapshot is not None:
            os.environ.pop("IMGUARD_BENCH_SNAPSHOT", None)
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved
    pid = gw.process.pid
    try:
        tls = ssl.create_default_context(cafile=str(gw.ca_file))
        warm = await login_many(gw.c2s_port, prosody, WARM, tls, f"warm-{tag}")
        for c in warm:
            c.close()
        await asyncio.sleep(1.0)
        if snapshot is not None:
            os.kill(pid, signal.SIGUSR1)
            await wait_file(Path(f"{snapshot}.1"))
        before = rss_kib(pid)
        start = time.perf_counter()
        clients = await login_many(gw.c2s_port, prosody, count, tls, f"idle-{tag}")
        login_time = time.perf_counter() - start
        await asyncio.sleep(2.0)
        after = rss_kib(pid)
        if snapshot is not None:
            os.kill(pid, signal.SIGUSR1)
            await wait_file(Path(f"{snapshot}.2"))
        for c in clients:
            c.close()
        if gw.crashed:
            raise RuntimeError(f"imguard run exited during the run:\n{gw.logs()}")
        return {"route": "c. imguard STARTTLS", "before": before, "after": after, "count": count,
                "per_conn": (after - before) / count, "login_time": login_time}
    finally:
        gw.stop()


async def wait_file(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    size = -1
    while time.monotonic() < deadline:      # written when its size stops changing
        if path.exists() and path.stat().st_size == size and size > 0:
            return
        size = path.stat().st_size if path.exists() else -1
        await asyncio.sleep(0.5)
    raise TimeoutError(f"no {path}")


# --- (o) OpenSSL alone ------------------------------------------------------------------------------------

def openssl_child(count: int, listen_port: int, upstream_port: int, confdir: str, upstream_ca: str) -> None:
    """The gateway's TLS objects alone: for every accepted client, a TLS server connection with a forged
    certificate, then a TLS client connection to the upstream, both over memory BIOs as mitmproxy holds them."""
    from mitmproxy import certs
    from mitmproxy.net import tls as net_tls
    from OpenSSL import SSL
    from imguard.gateway import tls_memory

    store = certs.CertStore.from_store(confdir, CONF_BASENAME, 2048)
    entry = store.get_cert("localhost", ["localhost"], None)
    shared = tls_memory.SharedCertificates()
    server_ctx = net_tls.create_client_proxy_context(
        method=net_tls.Method.TLS_SERVER_METHOD, min_version=net_tls.DEFAULT_MIN_VERSION,
        max_version=net_tls.DEFAULT_MAX_VERSION, cipher_list=None, ecdh_curve=None, chain_file=entry.chain_file,
        alpn_select_callback=None, request_client_cert=False, extra_chain_certs=(), dhparams=store.dhparams)
    client_ctx = net_tls.create_proxy_server_context(
        method=net_tls.Method.TLS_CLIENT_METHOD, min_version=net_tls.DEFAULT_MIN_VERSION,
        max_version=net_tls.DEFAULT_MAX_VERSION, cipher_list=None, ecdh_curve=None,
        verify=net_tls.Verify.VERIFY_PEER, ca_path=None, ca_pemfile=upstream_ca, client_cert=None,
        legacy_server_connect=False)
    cert, key = shared._shared(entry.cert), shared._shared_key(entry.privatekey)
    listener = socket.create_server(("127.0.0.1", listen_port))
    held = []

    stages: dict[str, int] = {}

    def mark(name: str, since: list[int]) -> None:
        now = heap()
        stages[name] = stages.get(name, 0) + now - since[0]
        since[0] = now

    def one() -> None:
        sock, _ = listener.accept()
        t = [heap()]
        down = SSL.Connection(server_ctx)
        down.set_accept_state()
        SSL._lib.SSL_use_certificate(down._ssl, cert._x509)
        SSL._lib.SSL_use_PrivateKey(down._ssl, key._pkey)
        tls_memory._openssl_lib.SSL_set_mode(down._ssl, tls_memory._SSL_MODE_RELEASE_BUFFERS)
        mark("down new", t)
        pump(down, sock)
        mark("down handshake", t)
        up_sock = socket.create_connection(("127.0.0.1", upstream_port))
        up = SSL.Connection(client_ctx)
        up.set_connect_state()
        up.set_tlsext_host_name(b"localhost")
        tls_memory._openssl_lib.SSL_set_mode(up._ssl, tls_memory._SSL_MODE_RELEASE_BUFFERS)
        mark("up new", t)
        pump(up, up_sock)
        mark("up handshake", t)
        for conn, s in ((up, up_sock), (down, sock)):      # one record each way (the stream header), as a session
            conn.sendall(b"<stream>")
            s.sendall(conn.bio_read(65536))
            exchange(conn, s)
        mark("exchange", t)
        if os.environ.get("IMGUARD_BENCH_KEEP_BIOS") is None:      # as SessionLayer does after the first read
            for conn in (down, up):
                tls_memory.renew_bios(conn)
        mark("renewed BIOs", t)
        held.append((sock, down, up_sock, up))

    for _ in range(WARM):
        one()
    print("warm", flush=True)
    sys.stdin.readline()
    time.sleep(0.5)
    before, heap0 = rss_kib(os.getpid()), heap()
    print("ready", flush=True)
    stages.clear()
    for _ in range(count):
        one()
    time.sleep(1.0)
    after, heap1 = rss_kib(os.getpid()), heap()
    print(json.dumps({"before": before, "after": after, "heap": (heap1 - heap0) / count / 1024,
                      "stages": {k: round(v / count / 1024, 2) for k, v in stages.items()}}), flush=True)
    sys.stdin.readline()


def heap() -> int:
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Mallinfo2
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


def pump(conn, sock: socket.socket) -> None:
    from OpenSSL import SSL
    while True:
        try:
            conn.do_handshake()
            break
        except SSL.WantReadError:
            flush(conn, sock)
            conn.bio_write(sock.recv(65536))
    flush(conn, sock)


def flush(conn, sock: socket.socket) -> None:
    from OpenSSL import SSL
    while True:
        try:
            out = conn.bio_read(65536)
        except SSL.WantReadError:
            return
        sock.sendall(out)


def exchange(conn, sock: socket.socket) -> None:
    """Read until one application record arrived (session tickets come first)."""
    from OpenSSL import SSL
    while True:
        try:
            if conn.recv(65536):
                flush(conn, sock)
                return
        except SSL.WantReadError:
            flush(conn, sock)
            conn.bio_write(sock.recv(65536))


async def measure_openssl(directory: Path, prosody: Prosody, count: int, confdir: Path) -> dict:
    """Run openssl_child; play its clients (TLS to it) and its upstream (a TLS server with Prosody's certificate)."""
    held = []

    async def upstream(reader, writer):
        held.append(writer)
        data = await reader.read(65536)
        writer.write(data)
        await reader.read()

    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(prosody.certs.cert_file, prosody.certs.key_file)
    server = await asyncio.start_server(upstream, "127.0.0.1", 0, ssl=server_tls)
    up_port = server.sockets[0].getsockname()[1]
    probe = socket.create_server(("127.0.0.1", 0))
    listen_port = probe.getsockname()[1]
    probe.close()
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--openssl-child", str(count), str(listen_port), str(up_port), str(confdir),
        str(prosody.ca_file), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    client_tls = ssl.create_default_context(cafile=str(confdir / f"{CONF_BASENAME}-ca-cert.pem"))
    writers = []

    async def client() -> None:
        for _ in range(100):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", listen_port, ssl=client_tls,
                                                               server_hostname="localhost")
                break
            except ConnectionRefusedError:
                await asyncio.sleep(0.1)
        writer.write(b"<stream>")
        await reader.read(1)
        writers.append(writer)

    try:
        for _ in range(WARM):
            await client()
        assert (await child.stdout.readline()).strip() == b"warm"
        child.stdin.write(b"\n")
        await child.stdin.drain()
        assert (await child.stdout.readline()).strip() == b"ready"
        for _ in range(count):
            await client()
        result = json.loads(await child.stdout.readline())
        child.stdin.write(b"\n")
        await child.stdin.drain()
        await child.wait()
    finally:
        if child.returncode is None:
            child.kill()
        for w in writers + held:
            w.close()
        server.close()
    print(f"  OpenSSL alone: malloc heap {result['heap']:.1f} KB per pair: {result['stages']}", file=sys.stderr)
    return {"route": "o. OpenSSL alone (2 TLS)", **result, "count": count,
            "per_conn": (result["after"] - result["before"]) / count, "login_time": 0.0}


# --- the breakdown ------------------------------------------------------------------------------------------

def breakdown(snapshot: Path, count: int, rss_growth_kib: int, top: int = 25) -> None:
    import tracemalloc
    first = tracemalloc.Snapshot.load(f"{snapshot}.1")
    second = tracemalloc.Snapshot.load(f"{snapshot}.2")
    diff = second.compare_to(first, "filename")
    python = sum(d.size_diff for d in diff)
    print(f"\nPython allocations the {count} idle connections added (tracemalloc, by file): "
          f"{python / count / 1024:.1f} KB per connection of {rss_growth_kib / count:.1f} KB RSS "
          f"(RSS under tracemalloc includes its own bookkeeping)")
    groups: dict[str, int] = {}
    for d in diff:
        name = d.traceback[0].filename
        key = ("imguard/" + name.split("/imguard/", 1)[1]) if "/imguard/" in name else (
            "mitmproxy/" + name.split("/mitmproxy/", 1)[1] if "/mitmproxy/" in name else
            "OpenSSL (pyOpenSSL/cryptography)" if "/OpenSSL/" in name or "/cryptography/" in name else
            "asyncio" if "/asyncio/" in name else name.rsplit("/", 2)[-1])
        groups[key] = groups.get(key, 0) + d.size_diff
    for key, size in sorted(groups.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {size / count:>8.0f} B/conn  {key}")
    print("by line (top):")
    for d in second.compare_to(first, "lineno")[:top]:
        frame = d.traceback[0]
        print(f"  {d.size_diff / count:>8.0f} B/conn  {d.count_diff / count:>5.1f} blocks  "
              f"{frame.filename.rsplit('site-packages/', 1)[-1].replace(str(ROOT) + '/', '')}:{frame.lineno}")


# --- main -----------------------------------------------------------------------------------------------------

async def main_async(args, directory: Path) -> None:
    raise_fd_limit(4 * args.count + 1024)
    prosody = Prosody.start(directory / "prosody", log_level="warn")
    rows = []
    try:
        for run in range(args.runs):
            row = await measure_imguard(directory, prosody, args.count, f"imguard-{run}")
            rows.append(row)
            print(f"  run {run + 1}: imguard {row['per_conn']:.1f} KB/conn", file=sys.stderr)
            confdir = next(p.parent for p in (directory / f"imguard-{run}").rglob(f"{CONF_BASENAME}-ca.pem"))
            row = await measure_openssl(directory, prosody, args.count, confdir)
            rows.append(row)
            print(f"  run {run + 1}: OpenSSL alone {row['per_conn']:.1f} KB/conn", file=sys.stderr)
        if args.breakdown:
            snapshot = directory / "tracemalloc"
            row = await measure_imguard(directory, prosody, args.count, "imguard-traced", snapshot)
            breakdown(snapshot, args.count, row["after"] - row["before"])
    finally:
        prosody.stop()
    print(f"\nidle XMPP connections after STARTTLS, intercepted ({os.cpu_count()} CPUs)")
    head = f"{'route':<26} {'count':>6} {'RSS before':>11} {'RSS after':>11} {'per conn':>10} {'login s':>8}"
    print(head)
    print("-" * len(head))
    for m in rows:
        print(f"{m['route']:<26} {m['count']:>6} {m['before'] / 1024:>9.1f}MB {m['after'] / 1024:>9.1f}MB "
              f"{m['per_conn']:>7.1f} KB {m['login_time']:>8.1f}")
    mine = [m["per_conn"] for m in rows if m["route"].startswith("c.")]
    alone = [m["per_conn"] for m in rows if m["route"].startswith("o.")]
    verdict = "meets" if mine and max(mine) <= TARGET_KB else "MISSES"
    print(f"imguard {verdict} the target of <= {TARGET_KB} KB per idle STARTTLS connection "
          f"({', '.join(f'{v:.1f}' for v in mine)} KB; OpenSSL alone {', '.join(f'{v:.1f}' for v in alone)} KB)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--openssl-child":
        count, listen_port, up_port = (int(a) for a in sys.argv[2:5])
        openssl_child(count, listen_port, up_port, sys.argv[5], sys.argv[6])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="idle connections")
    parser.add_argument("--runs", type=int, default=3, help="fresh gateways measured, one after the other")
    parser.add_argument("--breakdown", action="store_true", help="one more run under tracemalloc")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="imguard-bench-idle-"))
    try:
        asyncio.run(main_async(args, directory))
    finally:
        if args.keep:
            print(f"kept {directory}")
        else:
            import shutil
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
