"""Rule conditions: each compiles one `match:` key into an object whose test() says, in words, why it
matched (or returns None).

A condition is given an `Evaluation` (the message text or the file report, the context, and caches
shared by all rules for that one decision). Text conditions also return the spans they matched, which
the mask action rewrites. File conditions look at the report and every member below it (walk()).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from imguard.model import (ENCRYPTED, POLYGLOT, TYPE_MISMATCH, UNSCANNABLE, YARA_MATCH, ChatContext,
                           FileReport, Finding)
from imguard.policy.detectors import DETECTORS, Span
from imguard.policy.zones import PartyPattern, Zones, classify_direction


@dataclass
class Hit:
    reason: str
    spans: list[Span] = field(default_factory=list)


class Evaluation:
    """What one decision looks at, with caches shared by every rule evaluated for it."""

    def __init__(self, ctx: ChatContext, zones: Zones, text: str = "", report: FileReport | None = None) -> None:
        self.ctx = ctx
        self.zones = zones
        self.text = text
        self.report = report
        self.direction = classify_direction(ctx, zones)
        self.direction_derived = not ctx.direction and bool(self.direction)
        self._detected: dict[str, list[Span]] = {}
        self._reports: list[FileReport] | None = None
        self._sender_zone: str | None = None
        self._lower: str | None | bool = False

    @property
    def lower(self) -> str | None:
        """The text in lower case, when lower-casing keeps every offset (else None)."""
        if self._lower is False:
            low = self.text.lower()
            self._lower = low if len(low) == len(self.text) else None
        return self._lower

    def detect(self, name: str) -> list[Span]:
        spans = self._detected.get(name)
        if spans is None:
            spans = self._detected[name] = DETECTORS[name](self.text)
        return spans

    @property
    def reports(self) -> list[FileReport]:
        if self._reports is None:
            self._reports = list(self.report.walk()) if self.report is not None else []
        return self._reports

    @property
    def sender_zone(self) -> str:
        if self._sender_zone is None:
            self._sender_zone = self.zones.sender_zone(self.ctx)
        return self._sender_zone


class Condition:
    key: str = ""
    line: int = 0
    cost: int = 0           # cheap conditions are tested first
    is_text: bool = False   # yields spans the mask action can rewrite

    def test(self, ev: Evaluation, want_spans: bool = False) -> Hit | None:
        raise NotImplementedError


def where(report: FileReport) -> str:
    """How a reason names a report: 'file x.zip' for the file itself, 'member x.zip!a.exe' below it."""
    return f"file {report.name or report.path}" if report.depth == 0 else f"member {report.path or report.name}"


# --- context conditions ------------------------------------------------------------------------------

class SetCondition(Condition):
    """protocol, direction, client_zone, transfer_mechanism: the context value is one of a set."""

    def __init__(self, key: str, values: list[str], get: Callable[[Evaluation], str], label: str) -> None:
        self.key, self.values, self.get, self.label = key, {v.lower() for v in values}, get, label

    def test(self, ev: Evaluation, want_spans: bool = False) -> Hit | None:
        value = (self.get(ev) or "").lower()
        if value in self.values or (not value and "unknown" in self.values):
            extra = " (derived from zones)" if self.key == "direction" and ev.direction_derived else ""
            return Hit(f"{self.label} is {value or 'unknown'}{extra}")
        return None


class PartyCondition(Condition):
    """sender / recipient: any of the patterns fits the sender, or any one recipient."""
    cost = 1

    def __init__(self, key: str, patterns: list[PartyPattern]) -> None:
        self.key, self.patterns = key, patterns
        self.uses_zone = any(p.kind == "zone" for p in patterns)

    def test(self, ev: Evaluation, want_spans: bool = False) -> Hit | None:
        ctx = ev.ctx
        if self.key == "sender":
            parties = [(ctx.sender, ev.sender_zone if self.uses_zone else None)]
        else:
            parties = [(r, ev.zones.recipient_zone(ctx, r) if self.uses_zone else None) for r in ctx.recipients]
        for identity, zone in parties:
            for p in self.patterns:
                if p.matches(identity, ev.zones, zone):
                    return Hit(f"{self.key} {identity or '(none)'} matched {p.text!r}")
        return None


# --- text conditions ---------------------------------------------------------------------------------

class RegexCondition(Condition):
    """keywords and regex: one compiled regex (or, when patterns cannot be joined, a few)."""
    cost = 5
    is_text = True

    def __init__(self, key: str, regexes: list[re.Pattern], describe: Callable[[re.Match], str],
                 span_kind: str) -> None:
        self.key, self.regexes, self.describe, self.span_kind = key, regexes, describe, span_kind

    def test(self, ev: Evaluation, want_spans: bool = False) -> Hit | None:
        text = ev.text
        for rx in self.regexes:
            m = rx.search(text)
            if m is not None:
                break
        else:
            return None
        spans = []
        if want_spans:
            spans = [Span(x.start(), x.end(), self.span_kind) for rx in self.regexes
                     for x in rx.finditer(text) if x.end() > x.start()]
        return Hit(self.describe(m), spans)


class KeywordCondition(Condition):
    """keywords: case-insensitive, on word boundaries. A plain alternation of the lower-cased keywords
    finds candidates in the lower-cased text (CPython's re is 3-4x faster without IGNORECASE and
    lookbehind); each candidate is then confirmed by the exact regex at that position."""
    cost = 4
    is_text = True

    def __init__(self, key: str, fast: re.Pattern, exact: re.Pattern, describe: Callable[[re.Match], str]) -> None:
        self.key, self.fast, self.exact, self.describe = key, fast, exact, describe

    def _matches(self, ev: Evaluation, first_only: bool):
        low = ev.lower
        if low is None:       # rare: lower-casing changed lengths; use the case-insensitive regex
            for m in self.exact.finditer(ev.text):
                yield m
                if first_only:
                    return
            return
        pos = 0
        while True:
            cand = self.fast.search(low, pos)
            if cand is None:
                return
            m = self.exact.match(ev.text, cand.start())
            if m is None or m.end() == m.start():
                pos = cand.start() + 1
                continue
            yield m
            if first_only:
                return
            pos = m.end()

    def test(self, ev: Evaluation, want_spans: bool = False) -> Hit | None:
        found = list(self._matches(ev, not want_spans))
        if not found:
            return None
        spans = [Span(m.start(), m.end(), "keyword") for m in found] if want_spans else []
        return Hit(self.describe(found[0]), spans)


DETECTOR_WORDS = {
    "card": "payment card number", "private_key": "private key", "cloud_key": "cloud access key",
    "aws_key": "AWS access key", "github_token": "GitHub token", "slack_token": "Slack token",
    "google_api_key": "Google API key",
}


class DetectCondition(Condition):
    """detect: any of the named built-in detectors finds something."""
    cost = 6
    is_text = True

    def __init__(self, key: str, names: list[str]) -> None:
        self.key, self.names = key, names

    def test(self, ev: Evaluation, want_spans: bool = False) -> Hit | None:
        reasons, spans = [], []
        for name in self.names:
            found = ev.detect(name)
            if found:
                kinds = sorted({s.kind for s in found})
                what = ", ".join(DETECTOR_WORDS.get(k, k) for k in kinds)
                reasons.append(f"text contains {what} (detector {name}, {len(found)} found)")
                spans.extend(found)
                if not want_spans:
                    break
        if not reasons:
            return None
        return Hit("; ".join(reasons), spans)


# --- file conditions ---------------------------------------------------------------------------------

class ReportCondition(Condition):
    """A fact about the file or any member: `fact(report)` returns the words for it, or None.
    With `expect=False` the condition holds when no report has the fact."""
    cost = 3

    def __init__(self, key: str, fact: Callable[[FileReport], str | None], expect: bool = True,
                 absent: str = "") -> None:
        self.key, self.fact, self.expect, self.absent = key, fact, expect, absent

    def test(self, ev: Evaluation, want_spans: bool = False) -> Hit | None:
        for report in ev.reports:
            words = self.fact(report)
            if words:
                return Hit(words) if self.expect else None
        return None if self.expect else Hit(self.absent or f"no {self.key.replace('_', ' ')}")


class FileCondition(Condition):
    """A fact about the transfer as a whole (size, archive depth): `fact(evaluation)`."""
    cost = 2

    def __init__(self, key: str, fact: Callable[[Evaluation], str | None]) -> None:
        self.key, self.fact = key, fact

    def test(self, ev: Evaluation, want_spans: bool = False) -> Hit | None:
        if ev.report is None:
            return None
        words = self.fact(ev)
        return Hit(words) if words else None


def findings_of(report: FileReport, kind: str) -> list[Finding]:
    return [f for f in report.findings if f.kind == kind]


def yara_words(report: FileReport, f: Finding) -> str:
    rule, ns = f.data.get("rule", "?"), f.data.get("namespace", "")
    words = f"YARA rule {rule}" + (f" (namespace {ns})" if ns else "")
    return words + (f" in {where(report)}" if report.depth > 0 else "")


def yara_fact(test: Callable[[dict[str, Any]], str | None]) -> Callable[[FileReport], str | None]:
    """A fact from the report's YARA findings: `test(finding.data)` gives extra words or None."""
    def fact(report: FileReport) -> str | None:
        for f in report.findings:
            if f.kind == YARA_MATCH:
                extra = test(f.data)
                if extra is not None:
                    return yara_words(report, f) + extra
        return None
    return fact


def glob_fact(attr: str, patterns: list[str], label: str) -> Callable[[FileReport], str | None]:
    pats = [p.lower() for p in patterns]
    exact = {p for p in pats if not any(c in p for c in "*?[")}
    globs = [p for p in pats if p not in exact]

    def fact(report: FileReport) -> str | None:
        value = (getattr(report, attr, "") or "").lower()
        if value and (value in exact or any(fnmatch.fnmatchcase(value, g) for g in globs)):
            return f"{where(report)} {label} {value}"
        return None
    return fact


def finding_fact(kind: str, label: str, reasons: set[str] | None = None) -> Callable[[FileReport], str | None]:
    def fact(report: FileReport) -> str | None:
        for f in report.findings:
            if f.kind == kind and (reasons is None or str(f.data.get("reason", "")).lower() in reasons):
                detail = f.data.get("reason") if kind == UNSCANNABLE else ""
                detail = f"{detail}: {f.detail}" if detail and f.detail else (detail or f.detail)
                return f"{where(report)} {label}" + (f" ({detail})" if detail else "")
        return None
    return fact


def encrypted_fact(report: FileReport) -> str | None:
    if report.encrypted or findings_of(report, ENCRYPTED):
        return f"{where(report)} is encrypted"
    return None


def executable_member_fact(report: FileReport) -> str | None:
    if report.depth > 0 and report.family == "executable":
        return f"member {report.path or report.name} family executable"
    return None


FACT_KINDS = {"type_mismatch": (TYPE_MISMATCH, "type mismatch"), "polyglot": (POLYGLOT, "is a polyglot"),
              "unscannable": (UNSCANNABLE, "could not be fully inspected")}
