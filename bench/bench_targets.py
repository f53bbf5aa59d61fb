"""Every row of the performance issue's table (issue 21), measured in one run: runs the benchmarks that measure them,
one after the other on this machine, and prints each one's verdict lines (the figure, its baseline from the same
run, the ratio and the target) together at the end.

    .venv/bin/python bench/bench_targets.py             # one pass (about 15-25 minutes on a shared 2-core VM)
    .venv/bin/python bench/bench_targets.py --runs 3    # three passes, as the closing notes report them
    make bench-targets

The benchmarks themselves (each also runs alone, with its own options):
- bench_xmpp.py: XMPP relay CPU per message and throughput, 400 in flight, against plain mitmproxy and direct;
- bench_irc.py: IRC PRIVMSG lines/s, window 200, against plain mitmproxy and direct;
- bench_inspect.py: small files, archives (expanded bytes), files >= 1 MB on 1 and 2 threads, against raw yara;
- bench_idle.py: memory per idle intercepted STARTTLS connection.
Not a test: it asserts nothing; a benchmark that fails is reported as such and the others still run.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# (name, script, arguments): the table's rows, in the order.
BENCHMARKS = (
    ("xmpp", "bench_xmpp.py", ["--windows", "400"]),
    ("irc", "bench_irc.py", []),
    ("inspect", "bench_inspect.py", []),
    ("idle", "bench_idle.py", []),
)


# A row of bench_inspect.py's table that carries a target (its last column) or a measured floor.
TABLE_ROW = re.compile(r"^\([a-z]\) .*(>= [0-9.]+\s*$|\(floor\))")


def verdict_lines(output: str) -> list[str]:
    """The lines of a benchmark's output that give a figure against its target (each benchmark words them so, or
    puts the target in its table's last column) or its measured floor."""
    return [line.rstrip() for line in output.splitlines()
            if ("target" in line and not line.startswith(" ")) or TABLE_ROW.match(line)]


def run_once(only: set[str], timeout: float) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, script, args in BENCHMARKS:
        if only and name not in only:
            continue
        started = time.monotonic()
        print(f"--- {script} {' '.join(args)}", flush=True)
        try:
            done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            found[name] = [f"{script}: did not finish within {timeout:.0f} s"]
            continue
        sys.stdout.write(done.stdout)
        lines = verdict_lines(done.stdout)
        if done.returncode != 0:
            lines.append(f"{script} exited with status {done.returncode}: {done.stderr.strip()[-500:]}")
        found[name] = lines or [f"{script}: no figure against a target in its output"]
        print(f"--- {script}: {time.monotonic() - started:.0f} s\n", flush=True)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="passes over every benchmark")
    parser.add_argument("--only", default="", help="comma-separated subset: xmpp,irc,inspect,idle")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one benchmark may take")
    args = parser.parse_args()
    only = {name for name in args.only.split(",") if name}
    passes = [run_once(only, args.timeout) for _ in range(args.runs)]
    print("=" * 100)
    print("Issue 21's rows, each against its target (baselines measured in the same run):")
    for name, script, _ in BENCHMARKS:
        if only and name not in only:
            continue
        print(f"\n{script}")
        for number, found in enumerate(passes, 1):
            for line in found.get(name, []):
                print(f"  run {number}: {line.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
