"""Rule test cases: a folder of YAML cases (rules/tests/*.yaml), each a message or a file with its
context and the decision expected, run against a loaded policy.

    - name: a card number sent to an outside contact is flagged
      message: "my card is 4111 1111 1111 1111"
      context: {protocol: xmpp, direction: outbound, sender: alice@example.com, recipients: [bob@gmail.com]}
      expect: {action: alert, rule: card-number-outbound}

    - name: the EICAR test file is blocked
      file: {name: eicar.com, content: 'X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*'}
      context: {protocol: xmpp, direction: inbound}
      expect: {action: block, rule: malware}

A file is given as `content` (text, UTF-8), `content_base64`, or `path` (relative to the case file).
File cases run the real Inspector; without one they are reported as errors, never as passes. `engines` gives
what the external engines answer for the file, as they are not reached from a rule test:
`engines: {clamav: [Win.Test.EICAR_HDB-1], icap: [...]}` adds those `engine` findings to the report.

`expect` keys: action (required); rule (an id, or a list of ids, each of which must be among the
enforced or shadow matches); rules (the exact set of enforced rules that matched; [] = none);
shadow (the exact set of shadow-mode rules that matched); masked_text (the exact rewritten text);
notice_contains (text the notice must contain).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imguard.model import ACTIONS, ENGINE_MATCH, ChatContext, Decision, Finding
from imguard.policy.yamlsrc import Map, Seq, YamlError, load_yaml, type_name

CASE_KEYS = ("name", "message", "file", "context", "expect", "description", "engines")
CONTEXT_KEYS = ("protocol", "direction", "origin", "encryption", "sender", "recipients", "conversation",
                "client_address", "server_address", "transfer_mechanism", "name", "claimed_mime")
FILE_KEYS = ("name", "claimed_mime", "content", "content_base64", "path")
EXPECT_KEYS = ("action", "rule", "rules", "shadow", "masked_text", "notice_contains")

PASS, FAIL, ERROR = "pass", "fail", "error"


@dataclass
class CaseResult:
    file: str
    line: int
    name: str
    status: str                       # pass, fail or error
    message: str = ""                 # what differed, diff-like; or the error
    decision: Decision | None = None
    kind: str = ""                    # message or file

    @property
    def passed(self) -> bool:
        return self.status == PASS

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def __str__(self) -> str:
        head = f"{self.status.upper():5} {self.where} {self.name}"
        return head + ("\n" + "\n".join("      " + line for line in self.message.splitlines()) if self.message else "")


class _CaseError(Exception):
    pass


def _ids(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(i, str) for i in items):
        raise _CaseError(f"expect.{key}: expected a rule id or a list of rule ids")
    return list(items)


def _context(doc: Any, file_doc: dict) -> tuple[ChatContext, str, str]:
    doc = doc or {}
    if not isinstance(doc, dict):
        raise _CaseError(f"context: expected a mapping, got {type_name(doc)}")
    unknown = [k for k in doc if k not in CONTEXT_KEYS]
    if unknown:
        raise _CaseError(f"context: unknown key {unknown[0]!r}; allowed keys: {', '.join(CONTEXT_KEYS)}")
    values = {k: ("" if v is None else str(v)) for k, v in doc.items()
              if k not in ("recipients", "name", "claimed_mime")}
    recipients = doc.get("recipients") or ()
    recipients = tuple(str(r) for r in (recipients if isinstance(recipients, list) else [recipients]))
    name = str(file_doc.get("name", doc.get("name", "")) or "")
    claimed = str(file_doc.get("claimed_mime", doc.get("claimed_mime", "")) or "")
    return ChatContext(recipients=recipients, **values), name, claimed


def _file_bytes(doc: Any, case_file: Path) -> bytes:
    if not isinstance(doc, dict):
        raise _CaseError(f"file: expected a mapping with content, content_base64 or path, got {type_name(doc)}")
    unknown = [k for k in doc if k not in FILE_KEYS]
    if unknown:
        raise _CaseError(f"file: unknown key {unknown[0]!r}; allowed keys: {', '.join(FILE_KEYS)}")
    given = [k for k in ("content", "content_base64", "path") if k in doc]
    if len(given) != 1:
        raise _CaseError("file: give exactly one of content, content_base64, path")
    value = doc[given[0]]
    if not isinstance(value, str):
        raise _CaseError(f"file.{given[0]}: expected text, got {type_name(value)}")
    if given[0] == "content":
        return value.encode("utf-8")
    if given[0] == "content_base64":
        try:
            return base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _CaseError(f"file.content_base64: not base64: {exc}") from None
    path = (case_file.parent / value)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _CaseError(f"file.path: cannot read {value}: {exc.strerror or exc}") from None


def _engine_answers(doc: Any) -> list[Finding]:
    """`engines: {clamav: [name, ...], icap: name}` as the ENGINE_MATCH findings those engines would give."""
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise _CaseError(f"engines: expected a mapping of engine name to detection names, got {type_name(doc)}")
    findings = []
    for engine, names in doc.items():
        for name in names if isinstance(names, list) else [names]:
            if not isinstance(name, str) or not name:
                raise _CaseError(f"engines.{engine}: expected detection names, got {type_name(name)}")
            findings.append(Finding(ENGINE_MATCH, f"{engine} detection {name} (rule test)", "",
                                    {"engine": str(engine), "signature": name}))
    return findings


def _compare(expect: dict, decision: Decision) -> list[str]:
    """Differences as '- expected' / '+ got' lines."""
    diffs = []
    got_ids = decision.rule_ids
    shadow_ids = [m.rule_id for m in decision.shadow]
    if decision.action != expect["action"]:
        diffs += [f"- action: {expect['action']}", f"+ action: {decision.action}"]
    for rid in _ids(expect.get("rule"), "rule"):
        if rid not in got_ids and rid not in shadow_ids:
            diffs += [f"- rule {rid} among matches", f"+ matches: {', '.join(got_ids + shadow_ids) or '(none)'}"]
    for key, got in (("rules", got_ids), ("shadow", shadow_ids)):
        if key in expect:
            want = _ids(expect[key], key)
            if sorted(set(want)) != sorted(set(got)):
                diffs += [f"- {key}: {want}", f"+ {key}: {got}"]
    if "masked_text" in expect and decision.masked_text != expect["masked_text"]:
        diffs += [f"- masked_text: {expect['masked_text']!r}", f"+ masked_text: {decision.masked_text!r}"]
    if "notice_contains" in expect and str(expect["notice_contains"]) not in decision.notice:
        diffs += [f"- notice containing: {expect['notice_contains']!r}", f"+ notice: {decision.notice!r}"]
    return diffs


def run_case(case: Any, case_file: Path, line: int, policy: Any, inspector: Any = None) -> CaseResult:
    """Run one case (a mapping from a case file)."""
    from imguard.policy.engine import explain
    name = str(case.get("name", "")) if isinstance(case, dict) else ""
    result = CaseResult(case_file.name, line, name or f"case at line {line}", ERROR)
    try:
        if not isinstance(case, dict):
            raise _CaseError(f"a case must be a mapping with keys {', '.join(CASE_KEYS)}, got {type_name(case)}")
        unknown = [k for k in case if k not in CASE_KEYS]
        if unknown:
            raise _CaseError(f"unknown key {unknown[0]!r}; allowed keys: {', '.join(CASE_KEYS)}")
        if ("message" in case) == ("file" in case):
            raise _CaseError("give exactly one of message: (text) or file: (content, content_base64 or path)")
        expect = case.get("expect")
        if not isinstance(expect, dict) or "action" not in expect:
            raise _CaseError("expect: needs at least action: (one of " + ", ".join(ACTIONS) + ")")
        unknown = [k for k in expect if k not in EXPECT_KEYS]
        if unknown:
            raise _CaseError(f"expect: unknown key {unknown[0]!r}; allowed keys: {', '.join(EXPECT_KEYS)}")
        if expect["action"] not in ACTIONS:
            raise _CaseError(f"expect.action: {expect['action']!r} is not one of {', '.join(ACTIONS)}")
        for rid in _ids(expect.get("rule"), "rule") + _ids(expect.get("rules"), "rules") \
                + _ids(expect.get("shadow"), "shadow"):
            if policy.rule(rid) is None:
                raise _CaseError(f"expect: no rule with id {rid!r} in the policy")
        file_doc = case.get("file") if isinstance(case.get("file"), dict) else {}
        ctx, fname, claimed = _context(case.get("context"), file_doc)
        if "message" in case:
            result.kind = "message"
            text = case["message"]
            if text is not None and not isinstance(text, str):
                raise _CaseError(f"message: expected text, got {type_name(text)}")
            decision = policy.decide_message(text or "", ctx)
        else:
            result.kind = "file"
            data = _file_bytes(case["file"], case_file)
            if inspector is None:
                raise _CaseError("file case needs an Inspector (none given), so it was not run")
            report = inspector.inspect(data, ctx, name=fname, claimed_mime=claimed)
            report.findings.extend(_engine_answers(case.get("engines")))
            decision = policy.decide_file(report, ctx)
        result.decision = decision
        diffs = _compare(expect, decision)
        result.status = FAIL if diffs else PASS
        if diffs:
            result.message = "\n".join(diffs) + "\n" + explain(decision)
    except _CaseError as exc:
        result.message = str(exc)
    except Exception as exc:   # a broken case or inspector must show up as an error, not stop the run
        result.message = f"{type(exc).__name__}: {exc}"
    return result


def run_rule_tests(tests_dir: Path | str, policy: Any, inspector: Any = None) -> list[CaseResult]:
    """Run every case in tests_dir/*.yaml (name order) against `policy`; one CaseResult per case, plus
    one error result for each case file that cannot be read or parsed."""
    tests_dir = Path(tests_dir)
    results: list[CaseResult] = []
    files = sorted({p for pat in ("*.yaml", "*.yml") for p in tests_dir.glob(pat)}, key=lambda p: p.name)
    for path in files:
        try:
            doc = load_yaml(path.read_text(encoding="utf-8"))
        except YamlError as exc:
            results.append(CaseResult(path.name, max(exc.line, 1), "(case file)", ERROR, exc.message))
            continue
        except (OSError, UnicodeDecodeError) as exc:
            results.append(CaseResult(path.name, 1, "(case file)", ERROR, f"cannot read: {exc}"))
            continue
        if isinstance(doc, dict) and "cases" in doc:
            doc = doc["cases"]
        if doc is None:
            continue
        if not isinstance(doc, list):
            results.append(CaseResult(path.name, getattr(doc, "line", 1), "(case file)", ERROR,
                                      f"expected a list of cases (or a mapping with cases:), got {type_name(doc)}"))
            continue
        for i, case in enumerate(doc):
            line = case.line if isinstance(case, Map) else (doc.line_of(i) if isinstance(doc, Seq) else 1)
            results.append(run_case(case, path, line, policy, inspector))
    return results


def summary(results: list[CaseResult]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, ERROR)}
    return f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[ERROR]} errors"
