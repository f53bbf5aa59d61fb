"""Built-in detectors for secrets in message text.

Each detector takes a string and returns the spans it found, in order: `Span(start, end, kind)`,
where `kind` names what was found ("card", "private_key", "aws_key", ...). Policy uses the spans
both to explain a match and to mask the text (`[REDACTED:card]`).

Detectors look at no more than the text they are given; the engine caps that text at
`PolicyLimits.max_text_chars` (1 MiB characters by default) before calling them. Each runs in time linear
in the text: RE2 patterns (imguard.policy.matcher), whose candidates are also in the policy's pattern set
(`TRIGGERS`), so a message none of them can occur in costs a detector nothing. A detector takes the text,
or the `Scan` of it the policy already made.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Callable

from imguard.policy.matcher import CORE, DIGIT, Offsets, Scan, compile_regex, guarded


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str


# --- payment cards -----------------------------------------------------------------------------------

_DOUBLED = {str(d): (2 * d) % 9 if d != 9 else 9 for d in range(10)}     # a doubled digit's digit sum
_DIGIT = {str(d): d for d in range(10)}


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) check every payment card number passes (ASCII digits)."""
    rev = digits[::-1]
    try:
        total = sum(_DIGIT[c] for c in rev[0::2]) + sum(_DOUBLED[c] for c in rev[1::2])
    except KeyError:
        return False
    return total % 10 == 0


def card_brand(digits: str) -> str:
    """The card scheme whose issuer prefix (IIN) and length fit `digits`, or "" for none."""
    n = len(digits)
    p2, p3, p4, p6 = int(digits[:2]), int(digits[:3]), int(digits[:4]), int(digits[:6])
    if digits[0] == "4" and n in (13, 16, 19):
        return "visa"
    if (51 <= p2 <= 55 or 2221 <= p4 <= 2720) and n == 16:
        return "mastercard"
    if p2 in (34, 37) and n == 15:
        return "amex"
    if (p4 == 6011 or 644 <= p3 <= 649 or p2 == 65 or 622126 <= p6 <= 622925) and 16 <= n <= 19:
        return "discover"
    if 3528 <= p4 <= 3589 and 16 <= n <= 19:
        return "jcb"
    if (300 <= p3 <= 305 or p2 in (36, 38, 39) or p4 == 3095) and 14 <= n <= 19:
        return "diners"
    if p2 == 62 and 16 <= n <= 19:
        return "unionpay"
    if (p4 in (5018, 5020, 5038, 5893, 6304, 6759, 6761, 6762, 6763) or p2 == 50 or 56 <= p2 <= 58) \
            and 12 <= n <= 19:
        return "maestro"
    return ""


# 13 to 19 digits, optionally separated by single spaces or dashes, not glued to other digits (or a dash
# before). Any decimal digits (full-width ones too): they are read as the digits they are.
CARD_PATTERN = guarded(f"{DIGIT}(?:[ -]?{DIGIT}){{12,18}}", before=f"{DIGIT}-", after=DIGIT)
_CARD = compile_regex(CARD_PATTERN)


def _digits(chunk: str) -> str:
    digits = chunk.replace(" ", "").replace("-", "")
    return digits if digits.isascii() else "".join(str(unicodedata.decimal(c)) for c in digits)


def find_cards(text: "str | Scan") -> list[Span]:
    """Payment card numbers: 13-19 digits (spaces or dashes allowed), a known IIN prefix and a valid
    Luhn check digit. A run of identical digits (0000 0000 ...) is not a card."""
    scan = _scan(text)
    spans = []
    for start, end, _ in scan.finditer(_CARD, (CORE,)):
        digits = _digits(scan.text[start:end])
        if len(set(digits)) > 1 and luhn_ok(digits) and card_brand(digits):
            spans.append(Span(start, end, "card"))
    return spans


# --- private keys ------------------------------------------------------------------------------------

# The armour line of a PEM/OpenSSH/PGP private key; the span runs to the END line when one starts within
# KEY_BODY_CHARS characters after it. Found as two linear searches (the armour lines), paired in one pass:
# a lazy `[\s\S]{0,20000}?-----END` after each BEGIN would read up to 20000 characters per BEGIN line.
KEY_BODY_CHARS = 20000
_ARMOUR = "(?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----"
KEY_BEGIN_PATTERN = "-----BEGIN " + _ARMOUR
_KEY_BEGIN = compile_regex(KEY_BEGIN_PATTERN)
_KEY_END = compile_regex("-----END " + _ARMOUR)


def find_private_keys(text: "str | Scan") -> list[Span]:
    """PEM, OpenSSH and PGP private keys (`-----BEGIN ... PRIVATE KEY-----`), up to their END line."""
    scan = _scan(text)
    if "PRIVATE KEY" not in scan.text:          # cheap pre-check: most messages have none
        return []
    spans = []
    ends = Offsets(scan.data) if not scan.ascii else None      # END lines' offsets, counted apart (also in order)
    pos, end_line = 0, None        # end_line: the first END line at or after an earlier BEGIN line, or None
    ends_left = True
    while True:
        m = scan.find(_KEY_BEGIN, pos)
        if m is None:
            return spans
        begin, stop = m
        if ends_left and (end_line is None or end_line[0] < stop):
            found = scan.find(_KEY_END, stop)
            ends_left = found is not None
            end_line = (*found, ends.char(found[0]) if ends else found[0]) if found else None
        start_char, stop_char = scan.char(begin), scan.char(stop)
        if end_line is not None and end_line[2] - stop_char <= KEY_BODY_CHARS:
            stop = end_line[1]
            stop_char = scan.char(stop)
        spans.append(Span(start_char, stop_char, "private_key"))
        pos = stop


# --- cloud and service access keys -------------------------------------------------------------------

_CLOUD_KEYS: dict[str, tuple[str, str, str]] = {        # kind: (not before, the key, not after)
    "aws_key": ("A-Z0-9", "(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}", "A-Z0-9"),
    "github_token": ("A-Za-z0-9_", "(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})", ""),
    "slack_token": ("A-Za-z0-9", "xox[abposr]-[A-Za-z0-9-]{10,250}", ""),
    "google_api_key": ("A-Za-z0-9_-", "AIza[0-9A-Za-z_-]{35}", "A-Za-z0-9_-"),
}
CLOUD_KEY_PATTERN = "|".join(guarded(key, before, after).replace(f"?P<{CORE}>", f"?P<{kind}>")
                             for kind, (before, key, after) in _CLOUD_KEYS.items())
_CLOUD_KEY = compile_regex(CLOUD_KEY_PATTERN)
_KINDS = tuple(_CLOUD_KEYS)


def _finder(kinds: frozenset[str]) -> Callable[["str | Scan"], list[Span]]:
    def find(text: "str | Scan") -> list[Span]:
        scan = _scan(text)
        return [Span(start, end, kind) for start, end, kind in scan.finditer(_CLOUD_KEY, _KINDS) if kind in kinds]
    return find


find_cloud_keys = _finder(frozenset(_CLOUD_KEYS))
find_cloud_keys.__doc__ = ("Cloud and service access keys: AWS access key ids (AKIA...), GitHub tokens (ghp_...), "
                           "Slack tokens (xoxb-...), Google API keys (AIza...).")


def _scan(text: "str | Scan") -> Scan:
    return text if isinstance(text, Scan) else Scan(text)


# --- registry ----------------------------------------------------------------------------------------

DETECTORS: dict[str, Callable[[str], list[Span]]] = {
    "card": find_cards,
    "private_key": find_private_keys,
    "cloud_key": find_cloud_keys,
    **{kind: _finder(frozenset([kind])) for kind in _CLOUD_KEYS},
}

DETECTOR_HELP: dict[str, str] = {
    "card": "payment card numbers (13-19 digits, spaces/dashes allowed, known issuer prefix, Luhn check)",
    "private_key": "private keys: -----BEGIN ... PRIVATE KEY----- (PEM, OpenSSH, PGP)",
    "cloud_key": "any of aws_key, github_token, slack_token, google_api_key",
    "aws_key": "AWS access key ids (AKIA/ASIA... + 16 upper-case letters or digits)",
    "github_token": "GitHub tokens (ghp_, gho_, ghu_, ghs_, ghr_, github_pat_)",
    "slack_token": "Slack tokens (xoxa-, xoxb-, xoxp-, xoxo-, xoxs-, xoxr-)",
    "google_api_key": "Google API keys (AIza + 35 characters)",
}


# The pattern whose absence means the detector finds nothing (it joins the policy's pattern set).
TRIGGERS: dict[str, object] = {"card": _CARD, "private_key": _KEY_BEGIN, "cloud_key": _CLOUD_KEY,
                               **{kind: _CLOUD_KEY for kind in _CLOUD_KEYS}}


def detect(name: str, text: str) -> list[Span]:
    """Run the detector called `name` on `text`."""
    return DETECTORS[name](text)
