"""The message hot path in one process: what an allowed chat message costs imguard, without the network.

    .venv/bin/python bench/bench_hotpath.py [--protocol xmpp|irc] [--messages N] [--read 400] [--profile]
    .venv/bin/python bench/bench_hotpath.py --callgrind --messages 2000      # instructions per message
    .venv/bin/python bench/bench_hotpath.py --callgrind --reference-policy   # the same, policy's reference path
    .venv/bin/python bench/bench_hotpath.py --callgrind --without archive    # less a part: its cost by difference

Builds the pipeline `imguard run` builds (bundled rules and signatures, alerts.jsonl, the SQLite archive in a
temporary folder) and two logged-in sessions, as `bench_xmpp.py`/`bench_irc.py` have them: alice behind the
gateway sends (her session reads the messages from its client), bob behind the gateway receives (his session
reads them from the server), so every message is decided twice, as in the live benchmarks. Messages come
`--read` to a read; after each read the archive is committed, as `SessionLayer` does before it forwards.
The archive is closed at the end (its writer thread drains), so its whole cost is in the count.

It prints CPU seconds per message (process time: every thread, the archive's writer too). CPU time moves with
the machine's load; callgrind's instruction counts do not: run it twice under callgrind, with --messages 0
and with N, and divide the difference by N (`--callgrind` does that and prints the figure).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imguard.files.expected import ExpectedTransfers  # noqa: E402
from imguard.model import ChatContext  # noqa: E402
from imguard.runtime import build_pipeline  # noqa: E402

XMPP_LOGIN = ROOT / "tests" / "data" / "xmpp" / "httpupload_alice.json"
TEXT = "benchmark message number {n}: the quick brown fox jumps over the lazy dog"


def xmpp_sessions(pipeline):
    from imguard.protocols.xmpp import XmppSession
    segments = [(d == "c", s.encode("latin-1")) for d, s in json.loads(XMPP_LOGIN.read_text())["segments"]][:12]
    sessions = []
    for n, port in ((1, 41998), (2, 41999)):
        ctx = ChatContext(protocol="xmpp", client_address=f"127.0.0.1:{port}", server_address="127.0.0.1:15222",
                          connection_id=f"c{n}")
        s = XmppSession(pipeline, ExpectedTransfers(), ctx, stripped_auth_open=True)
        for from_client, data in segments:
            s.data_received(from_client, data)
        sessions.append(s)

    def sent(n):
        return (f"<message to='bob@localhost' type='chat' id='m{n}'><body>{TEXT.format(n=n)}</body></message>").encode()

    def received(n):
        return (f"<message from='bob@localhost/b' to='alice@localhost/t' type='chat' id='m{n}'>"
                f"<body>{TEXT.format(n=n)}</body></message>").encode()
    return sessions, sent, received


def irc_sessions(pipeline):
    from imguard.protocols.irc.session import IrcSession
    sessions = []
    for n, nick in ((1, "alice"), (2, "bob")):
        ctx = ChatContext(client_address=f"127.0.0.1:{41000 + n}", server_address="127.0.0.1:6667",
                          connection_id=f"c{n}")
        s = IrcSession(pipeline, ExpectedTransfers(), ctx)
        s.data_received(True, f"NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\n".encode())
        s.data_received(False, f":irc.test 001 {nick} :Welcome {nick}!u@127.0.0.1\r\n".encode())
        sessions.append(s)

    def sent(n):
        return f"PRIVMSG bob :{TEXT.format(n=n)}\r\n".encode()

    def received(n):
        return f":alice!u@h PRIVMSG bob :{TEXT.format(n=n)}\r\n".encode()
    return sessions, sent, received


def run(protocol: str, messages: int, read: int, warmup: int, without: tuple[str, ...] = ()) -> dict:
    with tempfile.TemporaryDirectory(prefix="imguard-hotpath-") as tmp:
        pipeline = build_pipeline(data_dir=Path(tmp), plain_flush_seconds=0.2)
        for part in without:            # a part's cost is the difference with a run without it
            getattr(pipeline, part).close()
            setattr(pipeline, part, None)
        (sender, receiver), sent, received = (xmpp_sessions if protocol == "xmpp" else irc_sessions)(pipeline)

        def relay(first: int, count: int) -> int:
            commands = 0
            for start in range(first, first + count, read):
                stop = min(start + read, first + count)
                for session, frame in ((sender, True), (receiver, False)):
                    data = b"".join((sent if frame else received)(n) for n in range(start, stop))
                    out = session.data_received(frame, data)
                    pipeline.commit()
                    commands += len(out)
            return commands

        relay(0, warmup)                # the per-context caches filled, as on a running gateway
        t0, c0 = time.perf_counter(), time.process_time()
        commands = relay(warmup, messages)
        pipeline.close()                # the archive's writer drains its queue: its cost is counted
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"protocol": protocol, "messages": messages, "commands": commands, "cpu_s": cpu, "wall_s": wall,
                "cpu_us_per_message": cpu / messages * 1e6 if messages else 0.0}


def callgrind(protocol: str, messages: int, read: int, warmup: int, reference: bool = False,
              without: tuple[str, ...] = ()) -> dict:
    """Instructions per message: a run with `messages` less a run with none, under callgrind."""
    counts = {}
    for n in (0, messages):
        with tempfile.TemporaryDirectory(prefix="imguard-cg-") as tmp:
            out = Path(tmp) / "cg.out"
            subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
                            "--protocol", protocol, "--messages", str(n), "--read", str(read), "--warmup",
                            str(warmup), *(["--reference-policy"] if reference else []),
                            *(["--without", ",".join(without)] if without else [])],
                           check=True, capture_output=True)
            text = out.read_text(errors="replace")
            counts[n] = int(re.search(r"^summary:\s+(\d+)", text, re.M).group(1))
    per = (counts[messages] - counts[0]) / messages
    return {"protocol": protocol, "messages": messages, "reference_policy": reference, "without": list(without),
            "instructions_per_message": round(per)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", choices=("xmpp", "irc"), default="xmpp")
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--read", type=int, default=400, help="messages to a read")
    ap.add_argument("--warmup", type=int, default=400)
    ap.add_argument("--reference-policy", action="store_true", help="every decision on the policy's reference path")
    ap.add_argument("--without", default="", help="parts left out, to measure them: archive,alert_log")
    ap.add_argument("--profile", action="store_true", help="cProfile the run, top functions by own time")
    ap.add_argument("--callgrind", action="store_true", help="instructions per message (two runs under callgrind)")
    args = ap.parse_args()
    if args.reference_policy:
        from imguard.policy import engine
        engine.REFERENCE = True
    without = tuple(p for p in args.without.split(",") if p)
    if args.callgrind:
        print(json.dumps(callgrind(args.protocol, args.messages, args.read, args.warmup, args.reference_policy,
                                   without)))
        return
    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        result = run(args.protocol, args.messages, args.read, args.warmup, without)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    else:
        result = run(args.protocol, args.messages, args.read, args.warmup, without)
    print(json.dumps(result))
    os._exit(0)


if __name__ == "__main__":
    main()
