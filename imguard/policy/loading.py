"""Loading and checking the policy: rules/*.yaml (one folder or several) -> Policy.

Load is all-or-nothing: every problem in every file is collected as `file:line: message` and raised
together in one PolicyError, and no Policy is built, so a caller that reloads keeps its old policy.
Evaluating a loaded policy is imguard.policy.engine's.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from pathlib import Path
from typing import Any, Iterable

from imguard.model import (ACTIONS, ENCRYPTION_SCHEMES, ENFORCE, FINDING_KINDS, MASK, MODES, SEVERITIES,
                           UNSCANNABLE_REASONS)
from imguard.model import DISCLAIM, SHADOW
from imguard.policy import conditions as C
from imguard.policy import matcher as M
from imguard.policy.detectors import DETECTORS
from imguard.policy.engine import Policy, PolicyError, PolicyLimits, Rule, parse_size
from imguard.policy.hashlists import HashLists, bundled_folder, folders_of, load_hash_lists
from imguard.policy.notice import check_template
from imguard.policy.walls import Wall, compile_wall
from imguard.policy.yamlsrc import Map, Seq, YamlError, load_yaml, type_name
from imguard.policy.zones import ZONES, PartyPattern, Zones

GROUPS_FILE = "groups.yaml"
RULE_FILE_PATTERNS = ("*.yaml", "*.yml")

RULE_KEYS = ("id", "title", "description", "severity", "mode", "action", "notify", "applies_to", "match",
             "unless", "enabled", "tags", "review")
REQUIRED_RULE_KEYS = ("id", "title", "severity", "action", "applies_to", "match")
APPLIES_TO = ("message", "file")

COMMON_CONDITIONS = ("protocol", "direction", "sender", "recipient", "client_zone", "tenant")
MESSAGE_CONDITIONS = ("keywords", "regex", "detect", "encrypted")      # encrypted: end to end (a file's: its own)
FILE_CONDITIONS = ("name", "extension", "mime", "family", "type_mismatch", "size_gt", "size_lt", "yara_rule",
                   "yara_namespace", "yara_file", "yara_tag", "yara_meta", "encrypted", "contains_executable",
                   "archive_depth_gt", "unscannable", "unscannable_reason", "polyglot", "finding",
                   "transfer_mechanism", "hash_list", "file_hash_list", "engine", "engine_signature")
ENGINES = ("clamav", "icap")        # the external engines' names (imguard/inspect/clamav.py, icap.py)
DIRECTION_VALUES = ("inbound", "outbound", "internal", "unknown")

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def _is_glob(value: str) -> bool:
    return any(c in value for c in "*?[")


_COMPARISON = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(-?\d+(?:\.\d+)?)\s*$")


def _meta_tests(ck: "_Checker", key: str, value: Any, line: int) -> list[C.MetaTest] | None:
    """The accepted values of one yara_meta key: numbers compared (">= 75", "> 40 and < 75"), "*" (present),
    globs or exact values."""
    vals = _strings(ck, key, value, line)
    if vals is None:
        return None
    tests = []
    for text in vals:
        text = text.strip()
        if text[:1] in "<>=!":
            parts = [_COMPARISON.match(part) for part in re.split(r"\s+and\s+", text, flags=re.IGNORECASE)]
            if not all(parts):
                ck.error(line, f"{key}: {text!r} is not a comparison like '>= 75' or '>= 40 and < 75' "
                               f"(operators >= > <= < == !=, then a number)")
                return None
            tests.append(C.MetaTest(text, tuple((m[1], float(m[2])) for m in parts)))
        else:
            tests.append(C.MetaTest(text.lower(), glob=_is_glob(text) and text != "*"))
    return tests


class _Checker:
    """Collects `file:line: message` errors for one file."""

    def __init__(self, filename: str, errors: list[str]) -> None:
        self.filename, self.errors = filename, errors

    def error(self, line: int, message: str) -> None:
        self.errors.append(f"{self.filename}:{max(line, 1)}: {message}")


def _strings(ck: _Checker, key: str, value: Any, line: int, lower: bool = False) -> list[str] | None:
    """A condition value as a non-empty list of strings (a single string is a list of one)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        ck.error(line, f"{key}: the list is empty (give at least one value)")
        return None
    out = []
    for i, item in enumerate(items):
        item_line = value.line_of(i) if isinstance(value, Seq) else line
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            ck.error(item_line, f"{key}: expected a string, got {type_name(item)}"
                     + (" (quote it: YAML reads yes/no/on/off as booleans)" if isinstance(item, bool) else ""))
            continue
        text = str(item)
        if not text.strip():
            ck.error(item_line, f"{key}: empty value")
            continue
        out.append(text.lower() if lower else text)
    return out if len(out) == len(items) else None


def _choice(ck: _Checker, key: str, values: list[str] | None, allowed: Iterable[str], line: int) -> list[str] | None:
    if values is None:
        return None
    allowed = tuple(allowed)
    bad = [v for v in values if v.lower() not in allowed]
    if bad:
        ck.error(line, f"{key}: {', '.join(repr(b) for b in bad)} is not one of: {', '.join(allowed)}")
        return None
    return [v.lower() for v in values]


def _bool(ck: _Checker, key: str, value: Any, line: int) -> bool | None:
    if not isinstance(value, bool):
        ck.error(line, f"{key}: expected true or false, got {type_name(value)}")
        return None
    return value


def _known_families() -> tuple[str, ...] | None:
    try:
        from imguard.inspect.filetype import FAMILIES  # type: ignore
    except Exception:   # the inspector is optional for policy checking
        return None
    return tuple(FAMILIES)


class _Compiler:
    """Turns rule mappings into Rules, recording every problem."""

    def __init__(self, groups: dict[str, list[PartyPattern]], known_yara_rules: set[str] | None,
                 max_memory: int = M.DEFAULT_MEMORY, yara_sources: dict[str, str] | None = None,
                 hash_lists: HashLists | None = None) -> None:
        self.groups = groups
        self.hash_lists = hash_lists or HashLists()
        self.max_memory = max_memory
        self.known_yara = known_yara_rules
        self.yara_sources: dict[str, str] | None = yara_sources
        self.families = _known_families()

    # one condition
    def condition(self, ck: _Checker, key: Any, value: Any, line: int, applies_to: str) -> C.Condition | None:
        if not isinstance(key, str):
            ck.error(line, f"condition name must be a string, got {type_name(key)}")
            return None
        allowed = COMMON_CONDITIONS + (MESSAGE_CONDITIONS if applies_to == "message" else FILE_CONDITIONS)
        if key not in allowed:
            other = "file" if applies_to == "message" else "message"
            if key in (FILE_CONDITIONS if other == "file" else MESSAGE_CONDITIONS):
                ck.error(line, f"condition {key!r} applies to {other} rules, not {applies_to} rules")
            else:
                ck.error(line, f"unknown condition {key!r}; allowed for {applies_to} rules: {', '.join(allowed)}")
            return None
        message_encrypted = key == "encrypted" and applies_to == "message"     # end to end, not a file's own
        compile_ = self.c_message_encrypted if message_encrypted else getattr(self, "c_" + key)
        cond = compile_(ck, key, value, line)
        if cond is not None:
            cond.key, cond.line = key, line
        return cond

    # context
    def c_protocol(self, ck, key, value, line):
        vals = _strings(ck, key, value, line, lower=True)
        return vals and C.SetCondition(key, vals, lambda ev: ev.ctx.protocol, "protocol")

    def c_direction(self, ck, key, value, line):
        vals = _choice(ck, key, _strings(ck, key, value, line), DIRECTION_VALUES, line)
        return vals and C.SetCondition(key, vals, lambda ev: ev.direction, "direction")

    def c_client_zone(self, ck, key, value, line):
        vals = _choice(ck, key, _strings(ck, key, value, line), ZONES, line)
        return vals and C.SetCondition(key, vals, lambda ev: ev.zones.address_zone(ev.ctx.client_address),
                                       "client zone")

    def c_tenant(self, ck, key, value, line):
        """tenant: the chat API workspace, instance or tenant the call goes to (ChatContext.tenant, named by
        imguard/protocols/httpchat/tenants.py); `unknown` matches a call whose tenant is not known."""
        vals = _strings(ck, key, value, line, lower=True)
        return vals and C.SetCondition(key, vals, lambda ev: ev.ctx.tenant, "tenant")

    def c_transfer_mechanism(self, ck, key, value, line):
        vals = _strings(ck, key, value, line, lower=True)
        return vals and C.SetCondition(key, vals, lambda ev: ev.ctx.transfer_mechanism, "transfer mechanism")

    def _parties(self, ck, key, value, line):
        vals = _strings(ck, key, value, line)
        if vals is None:
            return None
        patterns = []
        for v in vals:
            p = PartyPattern.parse(v)
            if p.kind == "group":
                if p.value not in self.groups:
                    known = ", ".join(sorted(self.groups)) or "none"
                    ck.error(line, f"{key}: unknown group {p.value!r} (groups defined in {GROUPS_FILE}: {known})")
                    continue
                p.members = self.groups[p.value]
            elif p.kind == "zone" and p.value not in ZONES:
                ck.error(line, f"{key}: zone {p.value!r} is not one of: {', '.join(ZONES)}")
                continue
            elif p.kind == "domain" and not p.value:
                ck.error(line, f"{key}: 'domain:' needs a domain name")
                continue
            patterns.append(p)
        return C.PartyCondition(key, patterns) if len(patterns) == len(vals) else None

    c_sender = c_recipient = _parties

    # text
    def c_keywords(self, ck, key, value, line):
        vals = _strings(ck, key, value, line)
        if vals is None:
            return None
        words = {re.sub(r"\s+", " ", v.strip()).lower(): v.strip() for v in vals}
        alternatives = "|".join(f"[{M.SPACE}]+".join(re.escape(part) for part in w.split(" "))
                                for w in sorted(words, key=len, reverse=True))
        try:
            regex = M.compile_regex(M.guarded(alternatives, before=M.WORD, after=M.WORD, flags="(?i)"),
                                    self.max_memory)
        except M.PatternError as exc:
            ck.error(line, f"{key}: the keywords cannot be matched by RE2: {exc}")
            return None

        def describe(found: str) -> str:
            found_key = re.sub(r"\s+", " ", found).lower()
            return f"text matched keyword {words.get(found_key, found)!r}"
        return C.KeywordCondition(key, regex, describe)

    def c_regex(self, ck, key, value, line):
        vals = _strings(ck, key, value, line)
        if vals is None:
            return None
        compiled = []
        for i, v in enumerate(vals):
            item_line = value.line_of(i) if isinstance(value, Seq) else line
            try:
                re.compile(v)
            except re.error as exc:
                ck.error(item_line, f"{key}: bad regular expression {v!r}: {exc}")
                continue
            try:
                rx = M.compile_regex(v, self.max_memory)
            except M.PatternError as exc:
                ck.error(item_line, f"{key}: {v!r} cannot be matched in linear time (RE2: {exc}); backreferences, "
                                    f"lookahead and lookbehind are not supported")
                continue
            if rx.search(b"") is not None:
                ck.error(item_line, f"{key}: {v!r} matches empty text, so it would match every message")
                continue
            compiled.append(rx)
        if len(compiled) != len(vals):
            return None
        # Every pattern of the policy joins one RE2 set (matcher.PatternSet), matched in one pass per message;
        # each pattern stays compiled on its own too, for the spans and the first match of those that occur.
        return C.RegexCondition(key, vals, compiled)

    def c_message_encrypted(self, ck, key, value, line):
        """encrypted: true | false | a scheme or a list of schemes (ENCRYPTION_SCHEMES)."""
        if isinstance(value, bool):
            return C.EncryptionCondition(key, value)
        if value is None or isinstance(value, dict):
            ck.error(line, f"{key}: expected true, false or a list of schemes ({', '.join(ENCRYPTION_SCHEMES)}), "
                           f"got {type_name(value)}")
            return None
        vals = _choice(ck, key, _strings(ck, key, value, line), ENCRYPTION_SCHEMES, line)
        return vals and C.EncryptionCondition(key, True, set(vals))

    def c_detect(self, ck, key, value, line):
        vals = _choice(ck, key, _strings(ck, key, value, line), DETECTORS, line)
        return vals and C.DetectCondition(key, vals)

    # file, per report
    def c_name(self, ck, key, value, line):
        vals = _strings(ck, key, value, line)
        return vals and C.ReportCondition(key, C.glob_fact("name", vals, "name matches"))

    def c_extension(self, ck, key, value, line):
        vals = _strings(ck, key, value, line, lower=True)
        return vals and C.ReportCondition(key, C.glob_fact("extension", [v.lstrip(".") for v in vals], "extension"))

    def c_mime(self, ck, key, value, line):
        vals = _strings(ck, key, value, line, lower=True)
        return vals and C.ReportCondition(key, C.glob_fact("mime", vals, "mime"))

    def c_family(self, ck, key, value, line):
        vals = _strings(ck, key, value, line, lower=True)
        if vals and self.families is not None:
            vals = _choice(ck, key, vals, self.families, line)
        return vals and C.ReportCondition(key, C.glob_fact("family", vals, "family"))

    def _finding_bool(self, ck, key, value, line):
        expect = _bool(ck, key, value, line)
        if expect is None:
            return None
        kind, label = C.FACT_KINDS[key]
        return C.ReportCondition(key, C.finding_fact(kind, label), expect)

    c_type_mismatch = c_polyglot = c_unscannable = _finding_bool

    def c_encrypted(self, ck, key, value, line):
        expect = _bool(ck, key, value, line)
        return None if expect is None else C.ReportCondition(key, C.encrypted_fact, expect, "nothing encrypted")

    def c_contains_executable(self, ck, key, value, line):
        expect = _bool(ck, key, value, line)
        return None if expect is None else C.ReportCondition(key, C.executable_member_fact, expect,
                                                             "no executable member")

    def c_unscannable_reason(self, ck, key, value, line):
        vals = _choice(ck, key, _strings(ck, key, value, line), UNSCANNABLE_REASONS, line)
        return vals and C.ReportCondition(key, C.finding_fact("unscannable", "could not be fully inspected",
                                                              set(vals)))

    def c_finding(self, ck, key, value, line):
        vals = _choice(ck, key, _strings(ck, key, value, line), FINDING_KINDS, line)
        if not vals:
            return None
        facts = [C.finding_fact(k, f"has finding {k}") for k in vals]
        return C.ReportCondition(key, lambda r: next((w for w in (f(r) for f in facts) if w), None))

    def _hash_list(self, ck, key, value, line):
        """hash_list (the file or any member) / file_hash_list (the file itself: a known-good exception): names of
        lists loaded from the hash-list folders."""
        vals = _strings(ck, key, value, line)
        if vals is None:
            return None
        missing = [v for v in vals if v not in self.hash_lists]
        if missing:
            ck.error(line, f"{key}: unknown hash list {', '.join(repr(m) for m in missing)} (loaded: "
                           f"{', '.join(sorted(self.hash_lists.lists)) or 'none'}; a list is NAME.txt in a rules "
                           f"folder's hashlists/ or a folder of the hash_lists setting)")
            return None
        lists = [self.hash_lists[v] for v in dict.fromkeys(vals)]
        return C.ReportCondition(key, C.hash_list_fact(lists, top_only=key == "file_hash_list"))

    c_hash_list = c_file_hash_list = _hash_list

    def c_engine(self, ck, key, value, line):
        """A detection by one of the named external engines (clamav, icap; "*": any)."""
        vals = _strings(ck, key, value, line, lower=True)
        if vals is not None and (bad := [v for v in vals if not _is_glob(v) and v not in ENGINES]):
            ck.error(line, f"{key}: {', '.join(repr(b) for b in bad)} is not one of: {', '.join(ENGINES)}")
            return None
        return vals and C.ReportCondition(key, C.engine_fact(C.glob_matcher(vals), lambda _: True))

    def c_engine_signature(self, ck, key, value, line):
        """A detection by an external engine whose signature name matches (globs, case-insensitive)."""
        vals = _strings(ck, key, value, line)
        return vals and C.ReportCondition(key, C.engine_fact(lambda _: True, C.glob_matcher(vals)))

    def _known_names(self, ck, key, vals, line, known: set[str] | None, what: str, shown: str = "") -> bool:
        """Exact names (not globs) must exist in the loaded signatures, when they are known."""
        if known is None:
            return True
        missing = [v for v in vals if not _is_glob(v) and v not in known]
        if missing:
            ck.error(line, f"{key}: unknown YARA {what} {', '.join(repr(m) for m in missing)} "
                           f"({shown or 'not in the loaded signatures'})")
        return not missing

    def c_yara_rule(self, ck, key, value, line):
        vals = _strings(ck, key, value, line)
        if vals is None or not self._known_names(ck, key, vals, line, self.known_yara, "rule"):
            return None
        names = {v for v in vals if not _is_glob(v)}            # exact names: case-sensitive, as YARA's
        glob = C.glob_matcher([v for v in vals if _is_glob(v)])   # globs: case-insensitive

        def test(d: dict) -> str | None:
            rule, ns = str(d.get("rule", "")), str(d.get("namespace", ""))
            full = f"{ns}.{rule}"
            return "" if rule in names or full in names or glob(rule) or glob(full) else None
        return C.ReportCondition(key, C.yara_fact(test))

    def c_yara_namespace(self, ck, key, value, line):
        vals = _strings(ck, key, value, line)
        if vals is None:
            return None
        known = {n.split(".", 1)[0] for n in self.known_yara if "." in n} if self.known_yara is not None else None
        if not self._known_names(ck, key, vals, line, known, "namespace",
                                 f"loaded: {', '.join(sorted(known or ())) or 'none'}"):
            return None
        matches = C.glob_matcher(vals)
        return C.ReportCondition(key, C.yara_fact(lambda d: "" if matches(str(d.get("namespace", ""))) else None))

    def c_yara_file(self, ck, key, value, line):
        vals = _strings(ck, key, value, line)
        if vals is None:
            return None
        # Which file each rule comes from is known from the loaded signatures (RuleNames.sources); a policy
        # loaded without them (rules explain) has no rule to match here.
        matches = C.glob_matcher(vals)
        files = {name: source.rsplit(":", 1)[0] for name, source in (self.yara_sources or {}).items()}
        rules = {name: file for name, file in files.items() if matches(file) or matches(Path(file).name)}

        def test(d: dict) -> str | None:
            source = rules.get(f"{d.get('namespace', '')}.{d.get('rule', '')}")
            return None if source is None else f" from {source}"
        return C.ReportCondition(key, C.yara_fact(test))

    def c_yara_tag(self, ck, key, value, line):
        vals = _strings(ck, key, value, line, lower=True)
        if vals is None:
            return None
        matches = C.glob_matcher(vals)

        def test(d: dict) -> str | None:
            hit = sorted(t for t in (str(t).lower() for t in d.get("tags", ()) or ()) if matches(t))
            return f" tag {hit[0]}" if hit else None
        return C.ReportCondition(key, C.yara_fact(test))

    def c_yara_meta(self, ck, key, value, line):
        if not isinstance(value, dict) or not value:
            ck.error(line, f"{key}: expected a mapping of meta key to value(s), e.g. {{score: \">= 75\"}} or "
                           f"{{severity: [high, critical]}}, got {type_name(value)}")
            return None
        wanted: dict[str, list[C.MetaTest]] = {}
        for k, v in value.items():
            tests = _meta_tests(ck, f"{key}.{k}", v, value.line_of(k) if isinstance(value, Map) else line)
            if tests is None:
                return None
            wanted[str(k)] = tests

        def test(d: dict) -> str | None:
            meta = d.get("meta", {}) or {}
            for k, tests in wanted.items():
                if k not in meta or not any(t.matches(meta[k]) for t in tests):
                    return None
            return " meta " + ", ".join(f"{k}={meta[k]}" for k in wanted)
        return C.ReportCondition(key, C.yara_fact(test))

    # file, whole transfer
    def _size(self, ck, key, value, line):
        limit = parse_size(value)
        if limit is None:
            ck.error(line, f"{key}: expected a size like 512, 100KB, 10MB or 1GB, got {type_name(value)}")
            return None
        shown = value if isinstance(value, str) else f"{value} bytes"
        if key == "size_gt":
            return C.FileCondition(key, lambda ev: f"file size {ev.report.size} bytes > {shown}"
                                   if ev.report.size > limit else None)
        return C.FileCondition(key, lambda ev: f"file size {ev.report.size} bytes < {shown}"
                               if ev.report.size < limit else None)

    c_size_gt = c_size_lt = _size

    def c_archive_depth_gt(self, ck, key, value, line):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            ck.error(line, f"{key}: expected a whole number >= 0, got {type_name(value)}")
            return None

        def fact(ev: C.Evaluation) -> str | None:
            deepest = max(ev.reports, key=lambda r: r.depth)
            return f"archive depth {deepest.depth} > {value} ({C.where(deepest)})" if deepest.depth > value else None
        return C.FileCondition(key, fact)

    # whole rule
    def block(self, ck: _Checker, value: Any, line: int, applies_to: str, what: str) -> list[list[C.Condition]] | None:
        blocks = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            ck.error(line, f"{what}: the list is empty")
            return None
        out, ok = [], True
        for i, blk in enumerate(blocks):
            blk_line = value.line_of(i) if isinstance(value, Seq) else line
            if not isinstance(blk, dict):
                ck.error(blk_line, f"{what}: expected a mapping of conditions (e.g. direction: outbound) "
                                   f"or a list of such mappings, got {type_name(blk)}")
                ok = False
                continue
            if not blk:
                ck.error(blk_line, f"{what}: needs at least one condition")
                ok = False
                continue
            conds = []
            for k, v in blk.items():
                c = self.condition(ck, k, v, blk.line_of(k) if isinstance(blk, Map) else blk_line, applies_to)
                if c is None:
                    ok = False
                else:
                    conds.append(c)
            conds.sort(key=lambda c: c.cost)
            out.append(conds)
        return out if ok else None

    def rule(self, ck: _Checker, doc: Any, line: int) -> Rule | None:
        if not isinstance(doc, dict):
            ck.error(line, f"a rule must be a mapping with keys {', '.join(REQUIRED_RULE_KEYS)}, ...; "
                           f"got {type_name(doc)}")
            return None
        ln = doc.line_of if isinstance(doc, Map) else (lambda k: line)
        errors_before = len(ck.errors)
        for k in doc:
            if k not in RULE_KEYS:
                ck.error(ln(k), f"unknown key {k!r} in rule; allowed keys: {', '.join(RULE_KEYS)}")
        for k in REQUIRED_RULE_KEYS:
            if k not in doc:
                ck.error(line, f"rule {doc.get('id', '?')!s}: missing required key {k!r}")
        rid = doc.get("id")
        if "id" in doc and (not isinstance(rid, str) or not _ID.match(rid)):
            ck.error(ln("id"), f"id: expected a name of letters, digits and - _ . : (max 128), got {type_name(rid)}")

        def text(key: str) -> str:
            v = doc.get(key, "")
            if v is None or not isinstance(v, (str, int, float)) or isinstance(v, bool):
                ck.error(ln(key), f"{key}: expected text, got {type_name(v)}")
                return ""
            return str(v)

        def one_of(key: str, allowed: tuple[str, ...], default: str | None = None) -> str:
            if key not in doc and default is not None:
                return default
            v = doc.get(key)
            if not isinstance(v, str) or v.lower() not in allowed:
                ck.error(ln(key), f"{key}: {type_name(v)} is not one of: {', '.join(allowed)}")
                return default or ""
            return v.lower()

        title = text("title") if "title" in doc else ""
        severity = one_of("severity", SEVERITIES) if "severity" in doc else ""
        mode = one_of("mode", MODES, ENFORCE)
        action = one_of("action", ACTIONS) if "action" in doc else ""
        applies_to = one_of("applies_to", APPLIES_TO) if "applies_to" in doc else ""
        description = text("description") if "description" in doc else ""
        notify = text("notify") if "notify" in doc else ""
        enabled = _bool(ck, "enabled", doc["enabled"], ln("enabled")) if "enabled" in doc else True
        tags = tuple(_strings(ck, "tags", doc["tags"], ln("tags")) or ()) if "tags" in doc else ()
        review = bool(_bool(ck, "review", doc["review"], ln("review"))) if "review" in doc else False
        if review and (action == DISCLAIM or mode == SHADOW):
            ck.error(ln("review"), "review: a disclaim or shadow-mode rule decides nothing, so it sends nothing to "
                                   "the review queue")
        if not applies_to:
            return None
        if notify:
            for problem in check_template(notify, applies_to):
                ck.error(ln("notify"), problem)
        match = self.block(ck, doc["match"], ln("match"), applies_to, "match") if "match" in doc else None
        unless = self.block(ck, doc["unless"], ln("unless"), applies_to, "unless") if "unless" in doc else []
        if action == DISCLAIM and applies_to != "message":
            ck.error(ln("action"), "action 'disclaim' only works on message rules (a notice when two parties "
                                   "first talk)")
        if action == MASK:
            if applies_to == "file":
                ck.error(ln("action"), "action 'mask' only works on message rules (it rewrites text); "
                                       "use block or quarantine for files")
            elif match is not None and not all(any(c.is_text for c in blk) for blk in match):
                ck.error(ln("action"), "action 'mask' needs a text condition (keywords, regex or detect) in "
                                       "every match block: its matches are what gets redacted")
        if len(ck.errors) > errors_before or match is None or unless is None or not enabled:
            return None
        return Rule(id=rid, title=title, severity=severity, mode=mode, action=action, applies_to=applies_to,
                    match=match, unless=unless, notify=notify, description=description, tags=tags,
                    file=ck.filename, line=line, review=review)


# --- groups and zones --------------------------------------------------------------------------------

GROUPS_FILE_KEYS = ("groups", "zones")


def _load_groups(ck: _Checker, doc: Any) -> tuple[dict[str, list[PartyPattern]], Zones]:
    groups: dict[str, list[PartyPattern]] = {}
    zones = Zones()
    if doc is None:
        return groups, zones
    if not isinstance(doc, dict):
        ck.error(getattr(doc, "line", 1), f"expected a mapping with keys {', '.join(GROUPS_FILE_KEYS)}, "
                                          f"got {type_name(doc)}")
        return groups, zones
    for k in doc:
        if k not in GROUPS_FILE_KEYS:
            ck.error(doc.line_of(k), f"unknown key {k!r}; allowed keys: {', '.join(GROUPS_FILE_KEYS)}")
    raw = doc.get("groups") or {}
    if not isinstance(raw, dict):
        ck.error(doc.line_of("groups"), f"groups: expected a mapping of group name to a list of members, "
                                        f"got {type_name(raw)}")
        raw = {}
    for name, members in raw.items():
        line = raw.line_of(name) if isinstance(raw, Map) else 1
        vals = _strings(ck, f"groups.{name}", members, line) if members else []
        if members is None or vals == []:
            ck.error(line, f"groups.{name}: a group needs at least one member")
            continue
        if vals is None:
            continue
        pats = [PartyPattern.parse(v) for v in vals]
        bad = [p.text for p in pats if p.kind in ("group", "zone") or (p.kind == "domain" and not p.value)]
        if bad:
            ck.error(line, f"groups.{name}: members are identities, globs or domain:...; not {', '.join(bad)}")
            continue
        groups[str(name)] = pats
    zdoc = doc.get("zones") or {}
    if not isinstance(zdoc, dict):
        ck.error(doc.line_of("zones"), f"zones: expected a mapping with key 'internal', got {type_name(zdoc)}")
        return groups, zones
    for k in zdoc:
        if k != "internal":
            ck.error(zdoc.line_of(k), f"zones: unknown zone {k!r}; only 'internal' is defined "
                                      f"(everything else is external)")
    internal = zdoc.get("internal") or {}
    if not isinstance(internal, dict):
        ck.error(zdoc.line_of("internal"), f"zones.internal: expected a mapping with keys domains, networks, "
                                           f"got {type_name(internal)}")
        return groups, zones
    for k in internal:
        if k not in ("domains", "networks"):
            ck.error(internal.line_of(k), f"zones.internal: unknown key {k!r}; allowed keys: domains, networks")
    domains = _strings(ck, "zones.internal.domains", internal["domains"], internal.line_of("domains"),
                       lower=True) if internal.get("domains") else []
    networks = []
    raw_nets = _strings(ck, "zones.internal.networks", internal["networks"], internal.line_of("networks")) \
        if internal.get("networks") else []
    for i, n in enumerate(raw_nets or []):
        try:
            networks.append(ipaddress.ip_network(n.strip(), strict=False))
        except ValueError as exc:
            nets = internal["networks"]
            ck.error(nets.line_of(i) if isinstance(nets, Seq) else internal.line_of("networks"),
                     f"zones.internal.networks: {exc}")
    return groups, Zones(tuple(d.lstrip("*.").lstrip(".") for d in domains or ()), tuple(networks))


def _wall(ck: _Checker, item: dict, line: int, groups: dict[str, list[PartyPattern]], seen: dict[str, str],
          where: str) -> Wall | None:
    """A list item `- wall: {between: [a, b], ...}`: the wall, its id unique among the rules' ids."""
    ln = item.line_of if isinstance(item, Map) else (lambda k: line)
    for k in item:
        if k != "wall":
            ck.error(ln(k), f"unknown key {k!r} beside 'wall'; a wall's settings go inside it")
            return None
    doc = item["wall"]
    wall = compile_wall(doc, ln("wall"), groups, ck.filename, ck.error)
    if wall is None:
        return None
    if not _ID.match(wall.id):
        ck.error(ln("wall"), f"wall: id: expected a name of letters, digits and - _ . : (max 128), got {wall.id!r}")
        return None
    if wall.id in seen:
        ck.error(ln("wall"), f"duplicate rule id {wall.id!r} (first defined at {seen[wall.id]})")
        return None
    seen[wall.id] = where
    return wall


# --- the policy --------------------------------------------------------------------------------------

def rule_files(rules_dir: Path) -> list[Path]:
    """The rule files of a rules folder, in evaluation (name) order: *.yaml and *.yml except groups.yaml."""
    files = {p for pattern in RULE_FILE_PATTERNS for p in rules_dir.glob(pattern) if p.is_file()}
    return sorted((p for p in files if p.name != GROUPS_FILE), key=lambda p: p.name)


def _read(path: Path, ck: _Checker) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        ck.error(1, f"not UTF-8 text: {exc}")
    except OSError as exc:
        ck.error(1, f"cannot read: {exc.strerror or exc}")
    return None


def _parse(text: str, ck: _Checker) -> tuple[bool, Any]:
    try:
        return True, load_yaml(text)
    except YamlError as exc:
        ck.error(exc.line, exc.message)
        return False, None


def load_policy(rules_dirs: Path | str | Iterable[Path | str], known_yara_rules: set[str] | None = None,
                limits: PolicyLimits | None = None, hash_list_dirs: str | Iterable[Path] = "") -> Policy:
    """Load and check every rule file in `rules_dirs` (one folder, or several: their files are evaluated folder by
    folder, each folder's in name order; at most one may hold groups.yaml). Raises PolicyError listing every
    problem as 'file:line: message' (the file's name for one folder, its path for several); on error nothing is
    returned, so the caller keeps its old policy.

    `known_yara_rules` (Signatures.rule_names: "rule" and "namespace.rule") makes references to YARA rules
    and namespaces that do not exist an error; without it they are not checked. Its `sources` attribute
    ("namespace.rule" -> "file:line", as Signatures.rule_names carries it) is what `yara_file` conditions use.
    Hash lists (policy/hashlists.py) are read from each folder's hashlists/ and from `hash_list_dirs` (the
    hash_lists setting); their errors are the policy's, and their content is part of its version."""
    folders = [Path(rules_dirs)] if isinstance(rules_dirs, (str, Path)) else [Path(d) for d in rules_dirs]
    errors: list[str] = [f"{d}:1: not a folder of rule files" for d in folders if not d.is_dir()]
    if not folders:
        errors.append("no rules folder given")
    if errors:
        raise PolicyError(errors)

    def label(path: Path) -> str:
        return path.name if len(folders) == 1 else str(path)

    digest = hashlib.sha256()
    groups: dict[str, list[PartyPattern]] = {}
    zones = Zones()
    groups_paths = [d / GROUPS_FILE for d in folders if (d / GROUPS_FILE).is_file()]
    if len(groups_paths) > 1:
        raise PolicyError([f"{p}:1: only one rules folder may hold {GROUPS_FILE} (also in {groups_paths[0]})"
                           for p in groups_paths[1:]])
    if groups_paths:
        groups_path = groups_paths[0]
        ck = _Checker(label(groups_path), errors)
        text = _read(groups_path, ck)
        if text is not None:
            digest.update(f"{GROUPS_FILE}\0{text}\0".encode())
            ok, doc = _parse(text, ck)
            if ok:
                groups, zones = _load_groups(ck, doc)
    limits = limits or PolicyLimits()
    hash_lists, list_errors = load_hash_lists(folders_of(folders, hash_list_dirs), bundled_folder())
    errors.extend(list_errors)
    if hash_lists.version:
        digest.update(f"hashlists\0{hash_lists.version}\0".encode())
    compiler = _Compiler(groups, set(known_yara_rules) if known_yara_rules is not None else None,
                         limits.max_regex_memory, getattr(known_yara_rules, "sources", None), hash_lists)
    rules: list[Rule] = []
    walls: list[Wall] = []
    seen: dict[str, str] = {}
    files = [path for folder in folders for path in rule_files(folder)]
    for path in files:
        ck = _Checker(label(path), errors)
        text = _read(path, ck)
        if text is None:
            continue
        digest.update(f"{label(path)}\0{text}\0".encode())
        ok, doc = _parse(text, ck)
        if not ok or doc is None:
            continue
        if isinstance(doc, dict):
            for k in doc:
                if k not in ("rules", "description"):
                    ck.error(doc.line_of(k), f"unknown top-level key {k!r}; a rule file is a list of rules or a "
                                             f"mapping with keys: rules, description")
            if "rules" not in doc:
                ck.error(doc.line, "a rule file is a list of rules or a mapping with a 'rules:' list")
                continue
            doc = doc["rules"]
            if doc is None:
                continue
        if not isinstance(doc, list):
            ck.error(getattr(doc, "line", 1), f"expected a list of rules, got {type_name(doc)}")
            continue
        for i, item in enumerate(doc):
            line = doc.line_of(i) if isinstance(doc, Seq) else 1
            if isinstance(item, Map):
                line = item.line
            if isinstance(item, dict) and "wall" in item:       # an ethical wall (imguard/policy/walls.py)
                wall = _wall(ck, item, line, groups, seen, f"{label(path)}:{line}")
                if wall is not None:
                    walls.append(wall)
                    rules.extend(wall.rules)
                continue
            rid = item.get("id") if isinstance(item, dict) else None
            if isinstance(rid, str):
                if rid in seen:
                    ck.error(line, f"duplicate rule id {rid!r} (first defined at {seen[rid]})")
                    continue
                seen[rid] = f"{label(path)}:{line}"
            rule = compiler.rule(ck, item, line)
            if rule is not None:
                rules.append(rule)
    if errors:
        raise PolicyError(errors)
    patterns = M.PatternSet(limits.max_regex_memory)
    for rule in rules:
        for block in rule.match + rule.unless:
            for cond in block:
                if isinstance(cond, C.TextCondition):
                    cond.register(patterns)
    try:
        patterns.compile()
    except M.PatternError as exc:
        raise PolicyError([f"{rules[0].source if rules else '?:1'}: {exc} (max_regex_memory)"]) from None
    return Policy(rules, zones, groups, digest.hexdigest()[:12], [label(p) for p in files], limits, patterns,
                  walls=walls)

