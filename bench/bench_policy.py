"""How many message decisions per second the bundled policy makes (one core), and what crafted text costs.

    .venv/bin/python bench/bench_policy.py [rules_dir]

Workloads: chat-sized clean messages (the common case), messages with a secret in them (detectors hit;
card-number-outbound alerts, the shadow mask rule computes spans), 4 KB pastes, and crafted 64 KiB messages
made to make a pattern work hard. Direction is left unknown so every decision also derives it from the zones.

Two comparisons in the same run:
- after / before: the text work of a decision (every keyword, regex and detector condition of the message rules)
  with RE2 and one pattern set per policy, against the same bundled patterns and detectors in Python's
  backtracking `re`, as the engine ran them before (`before` below); and whole decisions per second.
- crafted / plain: a crafted message against a plain one of the same length (the baseline: what any text of
  that length costs); a linear engine keeps this ratio small whatever the crafted text repeats.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imguard.model import ChatContext  # noqa: E402
from imguard.policy import load_policy  # noqa: E402
from imguard.policy.detectors import card_brand, luhn_ok  # noqa: E402

CLEAN = ["hi, are we still on for lunch?", "the build is green, merging now",
         "ticket PRJ-1234: please review https://example.com/x", "call me at 555 0100 tomorrow",
         "ok", "Can you send me the slides from yesterday's meeting? Thanks!"]
SECRETS = ["card 4111 1111 1111 1111 exp 12/29", "key AKIAIOSFODNN7EXAMPLE", "-----BEGIN PRIVATE KEY-----\nabc"]
PASTE = ("log line 2026-11-27 05:00:00 INFO request id=12345 took 12ms user=alice@example.com\n" * 50)[:4096]
CRAFTED_SIZE = 64 * 1024
CRAFTED = {
    "private key BEGIN lines": "-----BEGIN PRIVATE KEY-----",
    "card numbers": "4111 1111 1111 1111 ",
    "digits and spaces": "1 ",
    "AWS key ids": "AKIAIOSFODNN7EXAMPLE_",
    "link-like text": "https://a/",
}


# --- before: the bundled policy's text patterns in Python's re, as the engine ran them ------------------

_OLD_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
_OLD_RUN = re.compile(r"\d[\d -]{11,}\d")
_OLD_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----"
                      r"(?:[\s\S]{0,20000}?-----END (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----)?")
_OLD_CLOUD = re.compile(
    r"(?P<aws_key>(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}(?![A-Z0-9]))"
    r"|(?P<github_token>(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255}))"
    r"|(?P<slack_token>(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,250})"
    r"|(?P<google_api_key>(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-]))")
_OLD_MARKERS = ("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA", "ANVA", "AIPA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_",
                "github_pat_", "xox", "AIza")


def before(policy):
    """The text work of the policy's message rules, done the old way: each regex in Python's re, the detectors
    as they were (a digit-run pre-filter and a lookaround card pattern; a lazy scan after each BEGIN line)."""
    regexes = [re.compile(p) for r in policy.message_rules for b in r.match for c in b
               for p in getattr(c, "patterns", ())]

    def decide(text: str) -> int:
        found = sum(1 for rx in regexes if rx.search(text))
        for run in _OLD_RUN.finditer(text):
            for m in _OLD_CARD.finditer(text, run.start(), run.end()):
                d = m.group().replace(" ", "").replace("-", "")
                found += len(set(d)) > 1 and luhn_ok(d) and bool(card_brand(d))
        if "PRIVATE KEY" in text:
            found += sum(1 for _ in _OLD_KEY.finditer(text))
        if any(marker in text for marker in _OLD_MARKERS):
            found += sum(1 for _ in _OLD_CLOUD.finditer(text))
        return found
    return decide


def text_work(policy):
    """The text work of a decision now: one pass of the pattern set, then every text condition of the message
    rules (spans included, as a mask rule asks)."""
    from imguard.policy import conditions as C
    conds = [c for r in policy.message_rules for b in r.match for c in b if isinstance(c, C.TextCondition)]

    def decide(text: str) -> int:
        ev = C.Evaluation(ChatContext(), policy.zones, text=text, patterns=policy.patterns)
        return sum(1 for c in conds if c.test(ev, True) is not None)
    return decide


def rate(decide, messages, seconds=1.0) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for m in messages:
            decide(m)
        n += len(messages)
    return n / (time.perf_counter() - start)


def best(decide, text, runs=3, limit=60.0) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        decide(text)
        times.append(time.perf_counter() - start)
        if sum(times) > limit:
            break
    return min(times)


def main() -> None:
    rules = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "rules"
    policy = load_policy(rules)
    ctx = ChatContext(protocol="xmpp", sender="alice@example.com/laptop", recipients=("bob@gmail.com",))
    out = ChatContext(protocol="xmpp", direction="outbound", sender="alice@example.com",
                      recipients=("bob@gmail.com",))
    old, new = before(policy), text_work(policy)
    after = lambda m: policy.decide_message(m, ctx)          # noqa: E731
    print(f"policy {policy.version}: {len(policy.message_rules)} message rules, {len(policy.patterns)} patterns "
          f"in one RE2 set")
    print(f"{'workload':24} {'decisions/s':>12} {'text work/s after (RE2)':>24} {'before (re)':>12}")
    for label, msgs in (("clean chat messages", CLEAN), ("messages with secrets", SECRETS), ("4 KB pastes", [PASTE])):
        print(f"{label:24} {rate(after, msgs):>12,.0f} {rate(new, msgs):>24,.0f} {rate(old, msgs):>12,.0f}")
    plain = "x" * CRAFTED_SIZE
    base_after = best(lambda m: policy.decide_message(m, out), plain)
    base_before = best(old, plain)
    print(f"\ncrafted {CRAFTED_SIZE // 1024} KiB messages, outbound: seconds, and x the plain message of the same "
          f"length (after {base_after * 1000:.2f} ms, before {base_before * 1000:.2f} ms)")
    print(f"{'crafted text':28} {'after s':>10} {'x plain':>9} {'before s':>10} {'x plain':>9}")
    for label, piece in CRAFTED.items():
        text = (piece * (CRAFTED_SIZE // len(piece) + 1))[:CRAFTED_SIZE]
        t_after = best(lambda m: policy.decide_message(m, out), text)
        t_before = best(old, text)
        print(f"{label:28} {t_after:>10.4f} {t_after / base_after:>9.0f} {t_before:>10.4f} "
              f"{t_before / base_before:>9.0f}")


if __name__ == "__main__":
    main()
