"""Policy matching in linear time: RE2 for every text pattern, one pattern set per policy, detectors without
backtracking; patterns RE2 cannot run are refused with file:line. Times are compared within one run (a crafted
message against a plain one of the same length), never against absolute seconds."""

from __future__ import annotations

import random
import re
import shutil
import sys
import time
import unicodedata
from pathlib import Path

import pytest

from imguard import runtime
from imguard.model import ChatContext
from imguard.policy import PolicyError, load_policy
from imguard.policy import matcher as M
from imguard.policy.detectors import DETECTORS, find_cards, find_cloud_keys, find_private_keys, luhn_ok
from imguard.reload import PolicyReloader

ROOT = Path(__file__).resolve().parents[1]
RULES_DIR = ROOT / "rules"
OUT = ChatContext(protocol="xmpp", direction="outbound", sender="alice@example.com", recipients=("bob@gmail.com",))


def rule(match: str, rid: str = "r1", action: str = "alert") -> str:
    body = "\n".join("    " + line for line in match.splitlines())
    return f"- id: {rid}\n  title: Rule {rid}\n  severity: medium\n  action: {action}\n  applies_to: message\n" \
           f"  match:\n{body}\n"


def policy_of(tmp_path: Path, text: str):
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    (d / "r.yaml").write_text(text)
    return load_policy(d)


def errors_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(PolicyError) as exc:
        policy_of(tmp_path, text)
    return exc.value.errors


def best_time(fn, runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def ratio(policy, crafted: str, plain: str) -> float:
    assert len(crafted) == len(plain)
    # Both on the reference path: a plain text is otherwise allowed by the pattern set's pass alone (engine.py)
    return (best_time(lambda: policy.decide_message(crafted, OUT, reference=True))
            / best_time(lambda: policy.decide_message(plain, OUT, reference=True)))


# --- the stall the review found -----------------------------------------------------------------------

def test_a_message_of_private_key_headers_costs_about_what_a_plain_message_costs():
    """Python's lazy `[\\s\\S]{0,20000}?-----END` read up to 20000 characters after each of 9,700 BEGIN lines
    (seconds on the event loop, about 800 times a plain message); now BEGIN and END lines are found once each."""
    policy = load_policy(RULES_DIR)
    crafted = ("-----BEGIN PRIVATE KEY-----" * 9710)[:262144]
    decision = policy.decide_message(crafted, OUT)
    assert decision.action == "alert" and "private-key-outbound" in decision.rule_ids
    assert ratio(policy, crafted, "x" * len(crafted)) < 100      # ~30 here; the backtracking version ~800


@pytest.mark.parametrize("piece", [
    "-----BEGIN PRIVATE KEY-----",            # BEGIN lines and no END
    "-----BEGIN PRIVATE KEY-----é",           # the same in text that is not ASCII
    "-----END PRIVATE KEY-----",              # END lines and no BEGIN
    "4111 1111 1111 1111 ",                   # a card on every line
    "1 ",                                     # digits the card pattern keeps trying
    "AKIAIOSFODNN7EXAMPLE_",                  # an AWS key id after another
    "xoxb-",                                  # Slack prefixes
    "top top secret ",                        # keyword candidates
])
def test_every_detector_and_keyword_list_takes_time_linear_in_the_text(tmp_path, piece):
    """Four times the text takes about four times as long (a quadratic search would take sixteen), whatever
    the text repeats: each detector's and keyword list's matches are found in one left-to-right walk."""
    policy = policy_of(tmp_path, rule("keywords: [top secret, top]", action="mask")
                       + rule("detect: [card, private_key, cloud_key]", "d", "mask"))

    def cost(n: int) -> float:
        text = (piece * (n // len(piece) + 1))[:n]
        return best_time(lambda: policy.decide_message(text, OUT), runs=5)
    assert cost(1 << 18) / cost(1 << 16) < 10      # 4 when linear, 16 when quadratic; the machine is shared


def test_a_catastrophic_rule_regex_is_run_in_linear_time(tmp_path):
    """`(a+)+$` against a's and a '!' takes Python's re 2^n steps; RE2 takes one pass."""
    policy = policy_of(tmp_path, rule("regex: '(a+)+$'") + rule("keywords: [zz top]", "r2"))
    crafted = ("a" * 64 + "!") * 1000
    assert policy.decide_message(crafted, OUT).action == "allow"
    assert policy.decide_message("a" * 64, OUT).action == "alert"
    assert ratio(policy, crafted, "b" * len(crafted)) < 20


# --- what RE2 cannot run is refused with file:line ------------------------------------------------------

@pytest.mark.parametrize("pattern,why", [
    (r"(a)\1", "invalid escape sequence"),                        # backreference
    (r"(?P<x>a)(?P=x)", "invalid perl operator: (?P"),           # named backreference
    (r"secret(?!ary)", "invalid perl operator: (?!"),            # lookahead
    (r"(?<=top )secret", "invalid perl operator: (?<"),          # lookbehind
    (r"(?<!no )secret", "invalid perl operator: (?<"),           # negative lookbehind
    (r"[\S]+", "\\S inside [...]"),
])
def test_a_pattern_re2_cannot_run_is_refused_with_its_line(tmp_path, pattern, why):
    errors = errors_of(tmp_path, rule(f"regex:\n  - 'ok[0-9]+'\n  - '{pattern}'"))
    assert len(errors) == 1 and errors[0].startswith(f"r.yaml:9: regex: {pattern!r} cannot be matched in linear "
                                                     f"time (RE2: "), errors
    assert why in errors[0], errors


def test_rules_check_refuses_a_backreference_with_file_and_line(tmp_path, capsys):
    from imguard.cli import main
    (tmp_path / "r.yaml").write_text(rule("regex: '(x+)y\\1'"))
    assert main(["rules", "check", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(r"r.yaml:7: regex: '(x+)y\\1' cannot be matched in linear time")


def test_a_reload_with_a_lookbehind_keeps_the_running_policy(tmp_path):
    rules = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules, ignore=shutil.ignore_patterns("tests"))
    signatures = tmp_path / "signatures"
    shutil.copytree(ROOT / "signatures", signatures)
    pipeline = runtime.build_pipeline(rules, signatures, tmp_path / "data")
    reloader = PolicyReloader(pipeline, [rules], signatures, tmp_path / "data")
    good = pipeline.policy
    (rules / "50-bad.yaml").write_text(rule("regex: '(?<!not )secret'", "lookbehind", "block"))
    assert reloader.reload("test") is False
    assert pipeline.policy is good
    assert any(e.startswith("50-bad.yaml:7: regex:") and "linear time" in e for e in reloader.last_errors)
    assert pipeline.check_message("a secret", OUT).action == "allow"


# --- the same meaning as Python's re ------------------------------------------------------------------

def every_character() -> str:
    return "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)


@pytest.mark.parametrize("python,ours", [(r"\w", f"[{M.WORD}]"), (r"\s", f"[{M.SPACE}]"), (r"\d", M.DIGIT)])
def test_the_unicode_classes_are_pythons(python, ours):
    """Keyword boundaries and a rule's \\w \\s \\d mean what they meant with Python's re, over all of Unicode."""
    text = every_character()
    scan = M.Scan(text)
    assert [s[:2] for s in scan.finditer(M.compile_regex(ours + "+"))] == \
           [m.span() for m in re.finditer(python + "+", text)]


def test_rule_regexes_keep_pythons_unicode_classes(tmp_path):
    policy = policy_of(tmp_path, rule(r"regex: ['ref \d{3}\W', 'id=[^\s/]+$']"))
    assert policy.decide_message("ref ٣٤٥ ok", OUT).action == "alert"           # Arabic-Indic digits are \d
    assert policy.decide_message("ref 345é", OUT).action == "allow"             # é is \w
    assert policy.decide_message("id=abc\u00a0", OUT).action == "allow"          # no-break space is \s
    assert policy.decide_message("id=abc", OUT).action == "alert"


def old_keyword_regex(words: list[str]) -> re.Pattern:
    alternatives = "|".join(r"\s+".join(re.escape(p) for p in w.lower().split()) for w in
                            sorted(words, key=len, reverse=True))
    return re.compile(r"(?<!\w)(?:" + alternatives + r")(?!\w)", re.IGNORECASE)


def random_text(rng: random.Random, alphabet: list[str], n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_keyword_spans_match_the_lookaround_regex_on_random_text(tmp_path):
    """The guards stand for (?<!\\w) and (?!\\w): same spans as the lookaround regex, adjacent keywords included."""
    words = ["c++", "top secret", "top", "#x", "é", "a-b"]
    policy = policy_of(tmp_path, rule(f"keywords: {words!r}", action="mask"))
    ref = old_keyword_regex(words)
    rng = random.Random(7)
    alphabet = ["c++", "top", " ", "  ", "secret", "#x", "é", "É", "a-b", "x", "_", "\t", "\u00a0", "+", "ß", "İ"]
    for _ in range(2000):
        text = random_text(rng, alphabet, rng.randint(0, 12))
        want = ref.sub("[REDACTED:keyword]", text)
        decision = policy.decide_message(text, OUT)
        assert (decision.masked_text if decision.action == "mask" else text) == want, repr(text)


OLD_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
OLD_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----"
                     r"(?:[\s\S]{0,200}?-----END (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----)?")
OLD_CLOUD = re.compile(
    r"(?P<aws_key>(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}(?![A-Z0-9]))"
    r"|(?P<github_token>(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255}))"
    r"|(?P<slack_token>(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,250})"
    r"|(?P<google_api_key>(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-]))")


def test_detectors_find_what_the_backtracking_patterns_found(monkeypatch):
    """Differential: the linear detectors against the Python patterns they replace, on random text built from
    the pieces that matter (with a short key body so END lines fall both inside and outside it)."""
    from imguard.policy import detectors
    monkeypatch.setattr(detectors, "KEY_BODY_CHARS", 200)
    rng = random.Random(11)
    card_alphabet = ["4111", "1111", "5555", "4444", " ", "-", "0", "9", "x", "\u0664", "  "]
    key_alphabet = ["-----BEGIN ", "-----END ", "PRIVATE KEY-----", "RSA ", "PGP ", "BLOCK-----", "A B C ", "x" * 60,
                    "\n", "é"]
    cloud_alphabet = ["AKIA", "IOSFODNN7EXAMPLE", "ghp_", "a1B2" * 9, "xoxb-", "1234567890", "AIza", "-", "_", "x",
                      "SyD-abcdefghijklmnopqrstuvwxyz01234", "Z"]
    for _ in range(1500):
        text = random_text(rng, card_alphabet, rng.randint(0, 14))
        want = [m.span() for m in OLD_CARD.finditer(text)        # digits read as the digits they are
                if (d := "".join(str(unicodedata.decimal(c)) for c in m.group() if c not in " -"))
                and len(set(d)) > 1 and luhn_ok(d) and detectors.card_brand(d)]
        assert [(s.start, s.end) for s in find_cards(text)] == want, repr(text)
        text = random_text(rng, key_alphabet, rng.randint(0, 12))
        assert [(s.start, s.end) for s in find_private_keys(text)] == [m.span() for m in OLD_KEY.finditer(text)], \
            repr(text)
        text = random_text(rng, cloud_alphabet, rng.randint(0, 10))
        assert [(s.start, s.end, s.kind) for s in find_cloud_keys(text)] == \
               [(*m.span(), m.lastgroup) for m in OLD_CLOUD.finditer(text)], repr(text)


def test_full_width_card_digits_are_read_as_digits():
    text = "pay ４１１１ １１１１ １１１１ １１１１ now"
    assert [text[s.start:s.end] for s in find_cards(text)] == ["４１１１ １１１１ １１１１ １１１１"]


# --- one pass ------------------------------------------------------------------------------------------

def test_every_text_pattern_of_the_policy_is_in_one_set():
    policy = load_policy(RULES_DIR)
    regexes = sum(len(c.regexes) for r in policy.message_rules for b in r.match for c in b if hasattr(c, "regexes"))
    assert len(policy.patterns) == regexes + 3      # + the card, private key and cloud key candidates
    scan = policy.patterns.scan("nothing to see")
    assert scan.hits == {policy.patterns._sentinel}


def test_decisions_are_the_same_when_the_set_cannot_answer(monkeypatch):
    """If RE2's set gives up (its DFA out of memory), each pattern is searched alone: same decisions."""
    policy = load_policy([RULES_DIR, ROOT / "tests" / "data" / "rules"])
    texts = ["hello", "card 4111 1111 1111 1111 please", "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n",
             "AKIAIOSFODNN7EXAMPLE key", "project zeus budget", "?OTR:AAMD", "", "get https://x.io/a.exe now"]
    contexts = [OUT, ChatContext(protocol="xmpp", direction="inbound", sender="bob@gmail.com",
                                 recipients=("alice@example.com",))]
    with_set = [(t, c, policy.decide_message(t, c)) for t in texts for c in contexts]
    monkeypatch.setattr(M.PatternSet, "match", lambda self, data: None)
    for text, ctx, decision in with_set:
        again = policy.decide_message(text, ctx)
        assert (again.action, again.rule_ids, again.masked_text) == \
               (decision.action, decision.rule_ids, decision.masked_text), text


def test_text_with_lone_surrogates_and_nul_is_decided():
    policy = load_policy(RULES_DIR)
    for text in ("\udcff" * 100, "\x00" * 10, "card \udcff 4111 1111 1111 1111 \udcff"):
        policy.decide_message(text, OUT)
    text = "\udcff é 4111 1111 1111 1111 \udcff-----BEGIN PRIVATE KEY-----"
    assert [text[s.start:s.end] for s in find_cards(text)] == ["4111 1111 1111 1111"]
    assert [text[s.start:s.end] for s in DETECTORS["private_key"](text)] == ["-----BEGIN PRIVATE KEY-----"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
