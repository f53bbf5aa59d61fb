"""Built-in detectors for secrets in message text.

Each detector takes a string and returns the spans it found, in order: `Span(start, end, kind)`,
where `kind` names what was found ("card", "private_key", "aws_key", ...). Policy uses the spans
both to explain a match and to mask the text (`[REDACTED:card]`).

Detectors look at no more than the text they are given; the engine caps that text at
`PolicyLimits.max_text_chars` (1 MiB characters by default) before calling them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str


# --- payment cards -----------------------------------------------------------------------------------

# 13 to 19 digits, optionally separated by single spaces or dashes, not glued to other digits.
_CARD_CANDIDATE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) check every payment card number passes."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = ord(ch) - 48
        if i % 2 == 1:
            n *= 2
            if n > 9:
                n -= 9
        total += n
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


# A run of 13+ digits, spaces and dashes: only inside one can a card number be.
_DIGIT_RUN = re.compile(r"\d[\d -]{11,}\d")


def find_cards(text: str) -> list[Span]:
    """Payment card numbers: 13-19 digits (spaces or dashes allowed), a known IIN prefix and a valid
    Luhn check digit. A run of identical digits (0000 0000 ...) is not a card."""
    spans = []
    for run in _DIGIT_RUN.finditer(text):
        chunk = run.group()
        if len(chunk) - chunk.count(" ") - chunk.count("-") < 13:
            continue            # e.g. a date and time: too few digits to hold a card number
        for m in _CARD_CANDIDATE.finditer(text, run.start(), run.end()):
            digits = m.group().replace(" ", "").replace("-", "")
            if len(set(digits)) > 1 and luhn_ok(digits) and card_brand(digits):
                spans.append(Span(m.start(), m.end(), "card"))
    return spans


# --- private keys ------------------------------------------------------------------------------------

# The armour line of a PEM/OpenSSH/PGP private key; the span runs to the END line when it is present.
_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----"
    r"(?:[\s\S]{0,20000}?-----END (?:[A-Z0-9]+ ){0,3}PRIVATE KEY(?: BLOCK)?-----)?")


def find_private_keys(text: str) -> list[Span]:
    """PEM, OpenSSH and PGP private keys (`-----BEGIN ... PRIVATE KEY-----`), up to their END line."""
    if "PRIVATE KEY" not in text:          # cheap pre-check: most messages have none
        return []
    return [Span(m.start(), m.end(), "private_key") for m in _PRIVATE_KEY.finditer(text)]


# --- cloud and service access keys -------------------------------------------------------------------

_CLOUD_KEYS: dict[str, str] = {
    "aws_key": r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}(?![A-Z0-9])",
    "github_token": r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})",
    "slack_token": r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,250}",
    "google_api_key": r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])",
}
_CLOUD_KEY_RE = re.compile("|".join(f"(?P<{kind}>{pattern})" for kind, pattern in _CLOUD_KEYS.items()))


# Literal text each kind of key starts with: the regex runs only on text that has one (most has none).
_CLOUD_KEY_MARKERS: dict[str, tuple[str, ...]] = {
    "aws_key": ("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA", "ANVA", "AIPA"),
    "github_token": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    "slack_token": ("xox",),
    "google_api_key": ("AIza",),
}


def _finder(kinds: frozenset[str]) -> Callable[[str], list[Span]]:
    markers = tuple(m for kind in kinds for m in _CLOUD_KEY_MARKERS[kind])

    def find(text: str) -> list[Span]:
        if not any(marker in text for marker in markers):
            return []
        return [Span(m.start(), m.end(), m.lastgroup) for m in _CLOUD_KEY_RE.finditer(text)
                if m.lastgroup in kinds]
    return find


find_cloud_keys = _finder(frozenset(_CLOUD_KEYS))
find_cloud_keys.__doc__ = ("Cloud and service access keys: AWS access key ids (AKIA...), GitHub tokens (ghp_...), "
                           "Slack tokens (xoxb-...), Google API keys (AIza...).")


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


def detect(name: str, text: str) -> list[Span]:
    """Run the detector called `name` on `text`."""
    return DETECTORS[name](text)
