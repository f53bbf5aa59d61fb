"""Rule conditions: each compiles one `match:` key into an object whose test() says, in words, why it
matched (or returns None).

A condition is given an `Evaluation` (the message text or the file report, the context, and caches
shared by all rules for that one decision). Text conditions also return the spans they matched, which
the mask action rewrites. File conditions look at the report and every member below it (walk()).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable

from imguard.model import (ENCRYPTED, ENGINE_MATCH, POLYGLOT, TYPE_MISMATCH, UNSCANNABLE, YARA_MATCH, ChatContext,
                           FileReport, Finding)
from imguard.policy.detectors import DETECTORS, TRIGGERS, Span
from imguard.policy.matcher import CORE, PatternSet, Scan
from imguard.policy.zones import PartyPattern, Zones, classify_direction


@dataclass
class Hit:
    reason: str
    spans: list[Span] = field(default_factory=list)


class Evaluation:
    """What one decision looks at, with caches shared by every rule evaluated for it."""

    def __init__(self, ctx: ChatContext, zones: Zones, text: str = "", report: FileReport | None = None,
                 patterns: PatternSet | None = None) -> None:
        self.ctx = ctx
        self.zones = zones
        self.text = text
        self.report = report
        self.patterns = patterns
        self._scan: Scan | None = None
        self.direction = classify_direction(ctx, zones)
        self.direction_derived = not ctx.direction and bool(self.direction)
        self._detected: dict[str, list[Span]] = {}
        self._reports: list[FileReport] | None = None
        self._sender_zone: str | None = None

    @property
    def scan(self) -> Scan:
        """The text encoded once and matched against every pattern of the policy in one pass (on first use:
        a decision no text condition reaches costs nothing)."""
        if self._scan is None:
            self._scan = Scan(self.text, self.patterns)
        return self._scan

    def detect(self, name: str, trigger: int | None = None) -> list[Span]:
        spans = self._detected.get(name)
        if spans is None:
            found = self.scan.hit(TRIGGERS[name], trigger)
            spans = self._detected[name] = DETECTORS[name](self.scan) if found else []
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


class EncryptionCondition(Condition):
    """encrypted, in a message rule: the message is end-to-end encrypted (`schemes` None: by any scheme; a set:
    by one of those), or with `expect=False` it is not. The session that recognised the scheme put it in
    ChatContext.encryption; policy sees the fact, never the ciphertext (the text it checks is empty)."""

    def __init__(self, key: str, expect: bool = True, schemes: set[str] | None = None) -> None:
        self.key, self.expect, self.schemes = key, expect, schemes

    def test(self, ev: Evaluation, want_spans: bool = False) -> Hit | None:
        scheme = ev.ctx.encryption
        if not self.expect:
            return None if scheme else Hit("the message is not end-to-end encrypted")
        if scheme and (self.schemes is None or scheme in self.schemes):
            return Hit(f"the message is end-to-end encrypted ({scheme})")
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

class TextCondition(Condition):
    """A condition on the message text: its patterns join the policy's pattern set (`register`), and the
    set's one pass over the text tells it whether to look further."""
    is_text = True

    def register(self, patterns: PatternSet) -> None:
        raise NotImplementedError


class RegexCondition(TextCondition):
    """regex: the patterns (RE2, compiled at load), tried in order; the first that occurs is named."""
    cost = 5

    def __init__(self, key: str, patterns: list[str], regexes: list, span_kind: str = "regex") -> None:
        self.key, self.patterns, self.regexes, self.span_kind = key, patterns, regexes, span_kind
        self.ids: list[int] = []

    def register(self, patterns: PatternSet) -> None:
        self.ids = [patterns.add(rx) for rx in self.regexes]
        self.any_of = frozenset(self.ids)

    def test(self, ev: Evaluation, want_spans: bool = False) -> Hit | None:
        hits = ev.scan.hits
        if hits is not None and self.ids and hits.isdisjoint(self.any_of):
            return None         # the common case: none of the patterns occurs
        ids = self.ids or [None] * len(self.regexes)
        hits = [i for i, rx in enumerate(self.regexes) if ev.scan.hit(rx, ids[i])]
        if not hits:
            return None
        spans = []
        if want_spans:
            spans = [Span(start, end, self.span_kind) for i in hits
                     for start, end, _ in ev.scan.finditer(self.regexes[i])]
        return Hit(f"text matched regex '{self.patterns[hits[0]]}'", spans)


class KeywordCondition(TextCondition):
    """keywords: case-insensitive, on word boundaries (Python's Unicode \\w), as one RE2 alternation whose
    guards stand for the lookbehind and lookahead RE2 does not have (matcher.guarded)."""
    cost = 4

    def __init__(self, key: str, regex, describe: Callable[[str], str]) -> None:
        self.key, self.regex, self.describe = key, regex, describe
        self.id: int | None = None

    def register(self, patterns: PatternSet) -> None:
        self.id = patterns.add(self.regex)

    def test(self, ev: Evaluation, want_spans: bool = False) -> Hit | None:
        scan = ev.scan
        if not scan.hit(self.regex, self.id):
            return None
        found = scan.finditer(self.regex, (CORE,))
        first = next(found, None)
        if first is None:
            return None
        spans = []
        if want_spans:
            spans = [Span(start, end, "keyword") for start, end, _ in (first, *found)]
        return Hit(self.describe(scan.text[first[0]:first[1]]), spans)


DETECTOR_WORDS = {
    "card": "payment card number", "private_key": "private key", "cloud_key": "cloud access key",
    "aws_key": "AWS access key", "github_token": "GitHub token", "slack_token": "Slack token",
    "google_api_key": "Google API key",
}


class DetectCondition(TextCondition):
    """detect: any of the named built-in detectors finds something. Each detector's trigger (the pattern
    without which it finds nothing) is in the policy's pattern set."""
    cost = 6

    def __init__(self, key: str, names: list[str]) -> None:
        self.key, self.names = key, names
        self.triggers: list[int | None] = [None] * len(names)

    def register(self, patterns: PatternSet) -> None:
        self.triggers = [patterns.add(TRIGGERS[name]) for name in self.names]
        self.any_of = frozenset(self.triggers)

    def test(self, ev: Evaluation, want_spans: bool = False) -> Hit | None:
        hits = ev.scan.hits
        if hits is not None and self.triggers[0] is not None and hits.isdisjoint(self.any_of):
            return None         # the common case: no detector's candidate occurs
        reasons, spans = [], []
        for name, trigger in zip(self.names, self.triggers, strict=True):
            found = ev.detect(name, trigger)
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


def engine_fact(engine: Callable[[str], bool], signature: Callable[[str], bool]) -> Callable[[FileReport], str | None]:
    """A detection of an external engine (ClamAV, ICAP: ENGINE_MATCH findings) whose engine and signature match."""
    def fact(report: FileReport) -> str | None:
        for f in report.findings:
            if f.kind == ENGINE_MATCH:
                name, found = str(f.data.get("engine", "")), str(f.data.get("signature", ""))
                if engine(name) and signature(found):
                    return f"{where(report)}: {name} detected {found}"
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


def hash_list_fact(lists: list[Any], top_only: bool = False) -> Callable[[FileReport], str | None]:
    """The file (or, unless `top_only`, any member) has a digest on one of the hash lists (policy/hashlists.py)."""
    def fact(report: FileReport) -> str | None:
        if top_only and report.depth > 0:
            return None
        for hash_list in lists:
            found = hash_list.lookup(report.sha256, report.sha1, report.md5)
            if found is not None:
                named = f"{found.name}, " if found.name else ""
                return f"{where(report)} {found.digest} {found.value} is in hash list {hash_list.name} " \
                       f"({named}{found.source})"
        return None
    return fact


def executable_member_fact(report: FileReport) -> str | None:
    if report.depth > 0 and report.family == "executable":
        return f"member {report.path or report.name} family executable"
    return None


FACT_KINDS = {"type_mismatch": (TYPE_MISMATCH, "type mismatch"), "polyglot": (POLYGLOT, "is a polyglot"),
              "unscannable": (UNSCANNABLE, "could not be fully inspected")}


# --- YARA metadata -----------------------------------------------------------------------------------

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "!=": lambda a, b: a != b,
    "==": lambda a, b: a == b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}


def meta_number(value: Any) -> float | None:
    """A meta value as a number: `score = 80` and `score = "80"` both give 80.0; anything else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


@dataclass(frozen=True)
class MetaTest:
    """One accepted value of a yara_meta key, parsed at load:
    a number comparison (">= 75", "> 40 and < 75": every part must hold), `"*"` (the key is there, any value),
    a glob ("*.Trojan.*", case-insensitive) or an exact value (case-insensitive; 80 also matches "80")."""
    text: str
    comparisons: tuple[tuple[str, float], ...] = ()
    glob: bool = False

    def matches(self, value: Any) -> bool:
        if self.comparisons:
            number = meta_number(value)
            return number is not None and all(_OPERATORS[op](number, limit) for op, limit in self.comparisons)
        if self.text == "*":
            return True
        shown = str(value).lower()
        if self.glob:
            return fnmatch.fnmatchcase(shown, self.text)
        number, wanted = meta_number(value), meta_number(self.text)
        return shown == self.text or (number is not None and number == wanted)


def glob_matcher(patterns: list[str]) -> Callable[[str], bool]:
    """Exact values and globs (`*`, `?`, `[...]`), all case-insensitive."""
    pats = [p.lower() for p in patterns]
    exact = {p for p in pats if not any(c in p for c in "*?[")}
    globs = [p for p in pats if p not in exact]
    return lambda value: value.lower() in exact or any(fnmatch.fnmatchcase(value.lower(), g) for g in globs)
