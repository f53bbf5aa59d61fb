"""The policy's fast path (Policy.decide_message: a text in which none of the patterns the context's rules need
occurs is allowed without evaluating a rule) decides exactly as the reference path (every candidate rule
evaluated), over the bundled rules' cases, the test policies and a generated corpus of texts and contexts."""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from imguard.model import ALERT, ALLOW, ChatContext
from imguard.policy import engine, load_policy
from imguard.policy.testing import _context

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules"
TEST_RULES = ROOT / "tests" / "data" / "rules"
REPLAY_RULES = ROOT / "tests" / "data" / "replay" / "rules"

# Rules that can match a text in which no pattern occurs (context alone, an unless with a pattern, encryption),
# next to pattern rules of every kind: the contexts where they apply must take the reference path.
PATTERNLESS = """
rules:
  - id: every-outbound-irc
    title: Every IRC message going out
    severity: low
    action: alert
    applies_to: message
    match:
      protocol: irc
      direction: outbound
    unless:
      keywords: [lunch]
  - id: outside-sender-keyword
    title: A keyword from outside
    severity: medium
    action: warn
    applies_to: message
    match:
      - direction: inbound
        keywords: [invoice, payment]
      - sender: ["*@gmail.com"]
  - id: mask-codes
    title: Codes masked
    severity: low
    action: mask
    applies_to: message
    match:
      regex: 'CODE-\\d{4}'
  - id: encrypted-block
    title: Encrypted chat blocked
    severity: low
    action: block
    applies_to: message
    match:
      encrypted: [otr]
"""


def policies(tmp: Path) -> dict[str, object]:
    extra = tmp / "patternless"
    extra.mkdir()
    (extra / "50-patternless.yaml").write_text(PATTERNLESS)
    return {"bundled": load_policy(RULES), "bundled+tests": load_policy([RULES, TEST_RULES]),
            "replay": load_policy(REPLAY_RULES), "bundled+patternless": load_policy([RULES, extra])}


def case_messages() -> list[tuple[str, ChatContext]]:
    """(text, context) of every message case in rules/tests/."""
    out = []
    for path in sorted((RULES / "tests").glob("*.yaml")):
        for case in yaml.safe_load(path.read_text()) or []:
            if isinstance(case, dict) and "message" in case:
                ctx, _, _ = _context(case.get("context"), {})
                out.append((str(case["message"] or ""), ctx))
    return out


TEXTS = ["", "ok", "hi, are we still on for lunch?", "benchmark message number 7: the quick brown fox",
         "my card is 4111 1111 1111 1111, exp 12/29", "order 4111 1111 1111 1112 shipped", "key AKIAIOSFODNN7EXAMPLE",
         "-----BEGIN RSA PRIVATE KEY-----\nabc\n-----END RSA PRIVATE KEY-----", "see project-bluebird today",
         "this is classified", "get https://pastebin.com/abc now", "http://x.example/setup.exe ",
         "CODE-1234 and CODE-9",
         "the invoice is due", "payment", "ünïcødé \ud800 text", "1 2 3 4 5 6 7 8 9 0 1 2 3 4 5"]


def contexts() -> list[ChatContext]:
    out = []
    parties = [("alice@example.com", ("bob@gmail.com",)), ("bob@gmail.com", ("alice@example.com",)),
               ("alice@example.com", ("carol@example.com",)), ("alice", ("#payments",)), ("", ())]
    for protocol, direction, (sender, recipients), encryption in itertools.product(
            ("xmpp", "irc", "matrix"), ("", "outbound", "inbound", "internal"), parties, ("", "otr")):
        out.append(ChatContext(protocol=protocol, direction=direction, sender=sender, recipients=recipients,
                               encryption=encryption, client_address="10.1.2.3:50123",
                               server_address="198.51.100.10:6697"))
    return out


def corpus(messages: list[tuple[str, ChatContext]]) -> list[tuple[str, ChatContext]]:
    rng = random.Random(21)
    texts = TEXTS + [text for text, _ in messages]
    words = " ".join(texts).split()
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(150)]
    ctxs = contexts() + [ctx for _, ctx in messages]
    return messages + [(rng.choice(texts), rng.choice(ctxs)) for _ in range(3000)] + \
        [(text, ctx) for text in TEXTS for ctx in contexts()[::7]]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return policies(tmp_path_factory.mktemp("rules"))


@pytest.mark.parametrize("name", ["bundled", "bundled+tests", "replay", "bundled+patternless"])
def test_fast_path_decides_as_the_reference(loaded, name, monkeypatch):
    """Every decision the same, field by field (action, matches and their reasons, shadow, notice, masked text);
    and the fast path does take most of the corpus (else this test would compare the reference with itself)."""
    policy = loaded[name]
    taken = 0
    original = policy._decide

    def counting(*args, **kw):
        nonlocal taken
        taken += 1
        return original(*args, **kw)
    monkeypatch.setattr(policy, "_decide", counting)
    items = corpus(case_messages())
    for text, ctx in items:
        before = taken
        fast = policy.decide_message(text, ctx)
        skipped = taken == before
        reference = policy.decide_message(text, ctx, reference=True)
        assert asdict(fast) == asdict(reference), (name, text, ctx)
        assert not skipped or fast.action == ALLOW and not fast.shadow and not fast.disclaimers
    fast_share = 1 - (taken - len(items)) / len(items)
    assert fast_share > 0.2, fast_share


def test_reference_switch_and_patternless_contexts(loaded, monkeypatch):
    """A context where a rule matches on the context alone is decided on the reference path (alerted with no
    pattern in the text); the module switch sends every decision there."""
    policy = loaded["bundled+patternless"]
    out = ChatContext(protocol="irc", direction="outbound", sender="alice", recipients=("#x",))
    assert policy._quiet_patterns(out) is None
    assert policy.decide_message("nothing to see", out).action == ALERT
    assert policy.decide_message("lunch?", out).action == ALLOW
    inside = ChatContext(protocol="xmpp", direction="internal", sender="alice@example.com",
                         recipients=("carol@example.com",))
    assert policy._quiet_patterns(inside)       # the mask rule's pattern (and the bundled ones) are needed
    calls = []
    monkeypatch.setattr(policy, "_decide", lambda *a, **kw: calls.append(a) or engine.Policy._decide(policy, *a, **kw))
    assert policy.decide_message("nothing to see", inside).action == ALLOW
    assert calls == []
    monkeypatch.setattr(engine, "REFERENCE", True)
    assert policy.decide_message("nothing to see", inside).action == ALLOW
    assert len(calls) == 1
