"""How many message decisions per second the bundled policy makes (one core).

    .venv/bin/python bench/bench_policy.py [rules_dir]

Three workloads: chat-sized clean messages (the common case), messages with a secret in them
(detectors hit; card-number-outbound alerts, the shadow mask rule computes spans), and 4 KB pastes.
Direction is left unknown so every decision also derives it from the zones.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imguard.model import ChatContext  # noqa: E402
from imguard.policy import load_policy  # noqa: E402

CLEAN = ["hi, are we still on for lunch?", "the build is green, merging now",
         "ticket PRJ-1234: please review https://example.com/x", "call me at 555 0100 tomorrow",
         "ok", "Can you send me the slides from yesterday's meeting? Thanks!"]
SECRETS = ["card 4111 1111 1111 1111 exp 12/29", "key AKIAIOSFODNN7EXAMPLE", "-----BEGIN PRIVATE KEY-----\nabc"]
PASTE = ("log line 2026-11-27 05:00:00 INFO request id=12345 took 12ms user=alice@example.com\n" * 50)[:4096]


def rate(policy, messages, ctx, seconds=1.0) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for m in messages:
            policy.decide_message(m, ctx)
        n += len(messages)
    return n / (time.perf_counter() - start)


def main() -> None:
    rules = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "rules"
    policy = load_policy(rules)
    ctx = ChatContext(protocol="xmpp", sender="alice@example.com/laptop", recipients=("bob@gmail.com",))
    print(f"policy {policy.version}: {len(policy.message_rules)} message rules")
    for label, msgs in (("clean chat messages", CLEAN), ("messages with secrets", SECRETS), ("4 KB pastes", [PASTE])):
        print(f"{label:24} {rate(policy, msgs, ctx):>10,.0f} decisions/s")


if __name__ == "__main__":
    main()
