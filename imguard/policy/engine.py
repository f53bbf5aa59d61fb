"""Evaluating the policy: a loaded Policy (imguard.policy.loading checks and builds it) -> Decision.

Evaluation order (docs/rules.md explains it for policy authors): rule files in name order, rules in
file order. Every rule is evaluated, except that an enforce-mode `allow` rule that matches ends the
evaluation: rules after it are not evaluated. The decision's action is the strongest action among the
enforce-mode rules that matched (block > quarantine > warn > mask > alert > allow). Shadow-mode rules are
evaluated the same way and recorded in Decision.shadow, but change nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from imguard.model import (ACTIONS, ALLOW, BLOCK, DISCLAIM, MASK, QUARANTINE, SHADOW, WARN, ChatContext, Decision,
                           FileReport, RuleMatch)
from imguard.policy import conditions as C
from imguard.policy.detectors import Span
from imguard.policy.matcher import PatternSet, Scan
from imguard.policy.notice import ACTION_WORDS, human_size, render
from imguard.policy.zones import PartyPattern, Zones, classify_direction
from imguard.settings import MiB, setting

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2,
               "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1024 ** 3, "gib": 1024 ** 3, "t": 1024 ** 4,
               "tb": 1024 ** 4, "tib": 1024 ** 4}

DEFAULT_NOTICES = {
    ("message", BLOCK): "Your message was not delivered: it was blocked by the security policy ({reason}).",
    ("message", QUARANTINE): "Your message was not delivered: it is held for review by the security team "
                             "({reason}).",
    # WARN: the XMPP and IRC sessions add how to send it anyway (imguard/conversation.py); elsewhere it is refused.
    ("message", WARN): "Your message was held: it may break the security policy ({reason}).",
    ("file", WARN): "Your file {file.name} was not delivered: it may break the security policy ({reason}).",
    ("file", BLOCK): "Your file {file.name} was not delivered: it was blocked by the security policy ({reason}).",
    ("file", QUARANTINE): "Your file {file.name} was not delivered: it is held for review by the security "
                          "team ({reason}).",
}


# A `disclaim` rule without `notify`.
DEFAULT_DISCLAIMER = "This conversation is recorded by your company's chat security gateway."


@dataclass(frozen=True)
class PolicyLimits:
    """Policy limits"""
    max_text_chars: int = setting(
        1 * MiB, "Characters of a message that keyword, regex and detector conditions look at. Text past this "
                 "limit is not scanned and not masked; it bounds the time one huge message can take.")
    max_regex_memory: int = setting(
        64 * MiB, "Memory RE2 may use for one compiled pattern, and for the set of every text pattern of the "
                  "policy (program and DFA cache). A pattern or a policy that does not fit is refused at load.")


class PolicyError(Exception):
    """The policy could not be loaded; `errors` lists every problem as 'file:line: message'."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__(f"{len(self.errors)} error(s) in policy:\n" + "\n".join(self.errors))


def parse_size(value: Any) -> int | None:
    """'10MB' -> 10485760; 512 -> 512 (bytes). KB/MB/GB are binary (1 KB = 1024 bytes). None if invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if not isinstance(value, str):
        return None
    m = _SIZE.match(value)
    if not m:
        return None
    unit = (m.group(2) or "").lower()
    if unit not in _SIZE_UNITS:
        return None
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


# --- rules -------------------------------------------------------------------------------------------

@dataclass
class Rule:
    id: str
    title: str
    severity: str
    mode: str
    action: str
    applies_to: str
    match: list[list[C.Condition]]               # alternatives (OR) of conditions (AND)
    unless: list[list[C.Condition]] = field(default_factory=list)
    notify: str = ""
    description: str = ""
    tags: tuple[str, ...] = ()
    file: str = ""
    line: int = 0
    review: bool = False        # a match also goes to the console's review queue (supervision)

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line}"

    def evaluate(self, ev: C.Evaluation) -> tuple[list[str], list[Span]] | None:
        """(reasons, spans) when the rule matches, else None."""
        want_spans = self.action == MASK
        for block in self.match:
            reasons, spans = [], []
            for cond in block:
                hit = cond.test(ev, want_spans)
                if hit is None:
                    break
                reasons.append(hit.reason)
                spans.extend(hit.spans)
            else:
                break
        else:
            return None
        for block in self.unless:
            if all(cond.test(ev) is not None for cond in block):
                return None
        return reasons, spans


CANDIDATE_CACHE_SIZE = 4096     # contexts whose candidate message rules a policy remembers


def _context_only(cond: C.Condition) -> bool:
    """A condition decided by the chat context and the zones alone, never by a message's text."""
    return isinstance(cond, (C.SetCondition, C.PartyCondition, C.EncryptionCondition))


REFERENCE = False        # True: every message decision takes the reference path (Policy.decide_message)


def _needed_patterns(cond: C.Condition) -> frozenset[int]:
    """The pattern-set indexes of a text condition that fails when none of them occurs in the text; an empty set
    for a condition that can hold without them (any other kind: tested, never skipped)."""
    if type(cond) is C.RegexCondition and cond.ids:
        return frozenset(cond.ids)
    if type(cond) is C.KeywordCondition and cond.id is not None:
        return frozenset((cond.id,))
    if type(cond) is C.DetectCondition and cond.triggers and cond.triggers[0] is not None:
        return frozenset(cond.triggers)
    return frozenset()


class Policy:
    """A loaded, checked policy. Immutable; reload by loading a new one."""

    def __init__(self, rules: list[Rule], zones: Zones, groups: dict[str, list[PartyPattern]], version: str,
                 files: list[str], limits: PolicyLimits, patterns: PatternSet | None = None,
                 walls: list | None = None) -> None:
        self.rules = rules
        self.zones = zones
        self.groups = groups
        self.version = version
        self.files = files
        self.limits = limits
        self.patterns = patterns        # every text pattern of the message rules, matched in one pass
        self.walls = list(walls or ())  # ethical walls (policy/walls.py); their rules are in `rules` too
        self.message_rules = [r for r in rules if r.applies_to == "message"]
        self.file_rules = [r for r in rules if r.applies_to == "file"]
        self._by_id = {r.id: r for r in rules}
        self._candidates: dict[ChatContext, list[Rule]] = {}     # see _message_candidates
        self._quiet: dict[int, tuple[ChatContext, frozenset[int] | None]] = {}     # see _quiet_patterns
        self._quiet_values: dict[ChatContext, frozenset[int] | None] = {}

    def rule(self, rule_id: str) -> Rule | None:
        return self._by_id.get(rule_id)

    def classify_direction(self, ctx: ChatContext) -> str:
        return classify_direction(ctx, self.zones)

    def decide_message(self, text: Any, ctx: ChatContext | None = None, reference: bool = False) -> Decision:
        """Decide on one chat message. `text` may be anything: bytes are decoded as UTF-8, None is empty;
        only the first limits.max_text_chars characters are scanned.

        The fast path: when the pattern set's one pass finds none of the patterns the context's candidate
        rules need (`_quiet_patterns`), no rule can match and the message is allowed without evaluating one.
        `reference=True` (or REFERENCE) evaluates every candidate rule, as before; tests hold the two equal."""
        if text is None:
            text = ""
        elif isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8", "replace")
        elif not isinstance(text, str):
            text = str(text)
        ctx = ctx if isinstance(ctx, ChatContext) else ChatContext()
        scanned = text[: self.limits.max_text_chars]
        scan = None
        if not (reference or REFERENCE) and self.patterns is not None:
            entry = self._quiet.get(id(ctx))      # by identity: a session reuses one context object per peer
            needed = entry[1] if entry is not None and entry[0] is ctx else self._quiet_patterns(ctx)
            if needed is not None:
                scan = Scan(scanned, self.patterns)
                if scan.hits is not None and scan.hits.isdisjoint(needed):
                    return Decision(policy_version=self.version)
        ev = C.Evaluation(ctx, self.zones, text=scanned, patterns=self.patterns)
        if scan is not None:
            ev._scan = scan         # the pass made above, not made twice
        decision, spans = self._decide(self._message_candidates(ctx), ev, "message", {})
        if decision.action == MASK:
            decision.masked_text = mask_text(scanned, spans) + text[len(scanned):]
        return decision

    def _message_candidates(self, ctx: ChatContext) -> list[Rule]:
        """The message rules that can match in this context, in order: a rule is left out when each of its
        match blocks has a condition on the context alone (protocol, direction, zone, sender, recipient)
        that fails for it, since then no text can make it match. Remembered per context: a conversation's
        messages share one context, and most rules are about other directions or people. (Exact: what is
        left out would have evaluated to no match; unless blocks only ever take matches away.)"""
        candidates = self._candidates.get(ctx)
        if candidates is None:
            ev = C.Evaluation(ctx, self.zones)
            candidates = [rule for rule in self.message_rules
                          if any(all(cond.test(ev) is not None for cond in block if _context_only(cond))
                                 for block in rule.match)]
            if len(self._candidates) >= CANDIDATE_CACHE_SIZE:
                self._candidates.clear()
            self._candidates[ctx] = candidates
        return candidates

    def _quiet_patterns(self, ctx: ChatContext) -> frozenset[int] | None:
        """The pattern-set indexes without which no message rule can match in this context, or None when some
        rule can match a text in which no pattern occurs (a block of context conditions alone, or a condition
        this table does not know to need a pattern). Built once per context from the candidates' match blocks
        whose context conditions hold: each must have a text condition, and a text condition whose patterns
        are all absent fails (Regex-, Keyword- and DetectCondition.test return None then). Exact, like the
        candidates: unless blocks only take matches away."""
        if ctx in self._quiet_values:       # an equal context seen before (a carrier that makes one per message)
            result = self._quiet_values[ctx]
        else:
            result = self._quiet_values[ctx] = self._quiet_table(ctx)
        if len(self._quiet) >= CANDIDATE_CACHE_SIZE:
            self._quiet.clear()
            self._quiet_values.clear()
        self._quiet[id(ctx)] = (ctx, result)    # the context kept, so that its id is not reused meanwhile
        return result

    def _quiet_table(self, ctx: ChatContext) -> frozenset[int] | None:
        ev = C.Evaluation(ctx, self.zones)
        needed: set[int] | None = set()
        for rule in self._message_candidates(ctx):
            for block in rule.match:
                if not all(cond.test(ev) is not None for cond in block if _context_only(cond)):
                    continue        # this block cannot match in this context, whatever the text
                ids = [_needed_patterns(cond) for cond in block if not _context_only(cond)]
                if not any(ids):
                    needed = None   # the block can match a text in which no pattern occurs
                    break
                needed.update(*ids)
            if needed is None:
                break
        return frozenset(needed) if needed is not None else None

    def decide_membership(self, ctx: ChatContext) -> Decision:
        """Decide on one person letting another into a conversation (an invitation; a join where the session
        knows who is already there): `ctx.sender` invites or joins, `ctx.recipients` are the others. Only the
        ethical walls decide it (a wall's message rule, which tests the parties alone)."""
        ctx = ctx if isinstance(ctx, ChatContext) else ChatContext()
        ev = C.Evaluation(ctx, self.zones)
        decision, _ = self._decide([wall.message_rule for wall in self.walls], ev, "membership", {})
        return decision

    def decide_file(self, report: FileReport, ctx: ChatContext | None = None) -> Decision:
        """Decide on one file, given the inspector's report for it."""
        ctx = ctx if isinstance(ctx, ChatContext) else ChatContext()
        ev = C.Evaluation(ctx, self.zones, report=report)
        values = {"file.name": report.name, "file.size": human_size(report.size), "file.mime": report.mime,
                  "file.sha256": report.sha256}
        decision, _ = self._decide(self.file_rules, ev, "file", values)
        return decision

    def _decide(self, rules: list[Rule], ev: C.Evaluation, kind: str,
                values: dict[str, object]) -> tuple[Decision, list[Span]]:
        decision = Decision(policy_version=self.version)
        mask_spans: list[Span] = []
        ctx = ev.ctx
        base = {"sender": ctx.sender, "recipients": ", ".join(ctx.recipients), "protocol": ctx.protocol,
                "direction": ev.direction or "unknown", **values}
        for rule in rules:
            result = rule.evaluate(ev)
            if result is None:
                continue
            reasons, spans = result
            notice = ""
            if rule.notify:
                notice = render(rule.notify, self._notice_values(base, rule, reasons))
            m = RuleMatch(rule_id=rule.id, action=rule.action, severity=rule.severity, mode=rule.mode,
                          title=rule.title, reasons=reasons, notice=notice, source=rule.source)
            if rule.action == DISCLAIM and rule.mode != SHADOW:
                m.notice = m.notice or DEFAULT_DISCLAIMER
                decision.disclaimers.append(m)          # a notice to both parties, not an enforcement
                continue
            if rule.mode == SHADOW:
                decision.shadow.append(m)
                continue
            decision.matches.append(m)
            if rule.review:
                decision.review.append(rule.id)
            if rule.action == MASK:
                mask_spans.extend(spans)
            if rule.action == ALLOW:
                break       # an allow exception ends evaluation
        if decision.matches:
            strongest = max(ACTIONS.index(m.action) for m in decision.matches)
            decision.action = ACTIONS[strongest]
            top = [m for m in decision.matches if m.action == decision.action]
            decision.notice = next((m.notice for m in top if m.notice), "")
            default = DEFAULT_NOTICES.get((kind, decision.action))
            if not decision.notice and default:
                rule = self._by_id[top[0].rule_id]
                decision.notice = render(default, self._notice_values(base, rule, top[0].reasons))
        return decision, mask_spans

    @staticmethod
    def _notice_values(base: dict[str, object], rule: Rule, reasons: list[str]) -> dict[str, object]:
        return {**base, "reason": rule.title, "details": "; ".join(reasons), "rule.id": rule.id,
                "rule.title": rule.title, "severity": rule.severity,
                "action": ACTION_WORDS.get(rule.action, rule.action)}


def mask_text(text: str, spans: list[Span]) -> str:
    """Replace each span with [REDACTED:<kind>]; overlapping spans are merged (first kind wins)."""
    if not spans:
        return text
    out, pos = [], 0
    merged: list[list] = []
    for s in sorted(spans, key=lambda s: (s.start, -s.end)):
        if merged and s.start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], s.end)
        else:
            merged.append([s.start, s.end, s.kind])
    for start, end, kind in merged:
        out.append(text[pos:start])
        out.append(f"[REDACTED:{kind}]")
        pos = end
    out.append(text[pos:])
    return "".join(out)


# --- loading -----------------------------------------------------------------------------------------

def explain(decision: Decision) -> str:
    """The decision in words, one line per matched rule (for --explain and test output)."""
    lines = [f"action: {decision.action} (policy {decision.policy_version})"]
    for label, matches in (("", decision.matches), ("shadow ", decision.shadow)):
        for m in matches:
            lines.append(f"  {label}rule {m.rule_id} [{m.action}, {m.severity}] at {m.source}: {m.title}")
            lines.extend(f"    - {r}" for r in m.reasons)
    if decision.review:
        lines.append(f"  review: queued for a reviewer by {', '.join(decision.review)}")
    if decision.notice:
        lines.append(f"  notice: {decision.notice}")
    return "\n".join(lines)
