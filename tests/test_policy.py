"""The policy engine: rule format, checking (file:line errors), conditions, actions, evaluation order."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from imguard.model import (ENCRYPTED, POLYGLOT, TYPE_MISMATCH, UNSCANNABLE, YARA_MATCH, ChatContext, FileReport,
                           Finding)
from imguard.policy import PolicyError, PolicyLimits, explain, load_policy, parse_size

RULES_DIR = Path(__file__).resolve().parent.parent / "rules"

OUT = ChatContext(protocol="xmpp", direction="outbound", sender="alice@example.com", recipients=("bob@gmail.com",))
IN = ChatContext(protocol="xmpp", direction="inbound", sender="bob@gmail.com", recipients=("alice@example.com",))
INT = ChatContext(protocol="xmpp", direction="internal", sender="alice@example.com",
                  recipients=("carol@example.com",))

GROUPS = """
zones:
  internal:
    domains: [example.com]
    networks: [10.0.0.0/8]
groups:
  finance: [cfo@example.com, "*@fin.example.com"]
"""


def write(tmp_path: Path, files: dict[str, str], groups: str | None = GROUPS) -> Path:
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    if groups is not None:
        (d / "groups.yaml").write_text(groups)
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def policy(tmp_path: Path, rules: str, name: str = "r.yaml", **kw):
    return load_policy(write(tmp_path, {name: rules}), **kw)


def errors_of(tmp_path: Path, files: dict[str, str], groups: str | None = GROUPS, **kw) -> list[str]:
    with pytest.raises(PolicyError) as exc:
        load_policy(write(tmp_path, files, groups), **kw)
    return exc.value.errors


def rule(id="r1", action="alert", applies_to="message", match="keywords: [secret]", extra=""):
    body = "\n".join("    " + line for line in match.splitlines())
    return (f"- id: {id}\n  title: Rule {id}\n  severity: medium\n  action: {action}\n"
            f"  applies_to: {applies_to}\n{extra}  match:\n{body}\n")


def report(name="f.bin", mime="application/octet-stream", family="other", size=10, findings=(), members=(),
           depth=0, path=None, extension="", encrypted=False) -> FileReport:
    return FileReport(name=name, path=path or name, size=size, mime=mime, family=family, depth=depth,
                      extension=extension or (name.rsplit(".", 1)[1] if "." in name else ""),
                      encrypted=encrypted, findings=list(findings), members=list(members))


def yara(rule, namespace="ns", tags=(), meta=None):
    return Finding(YARA_MATCH, f"YARA rule {rule}", data={"rule": rule, "namespace": namespace, "tags": list(tags),
                                                          "meta": meta or {}})


# --- the format ----------------------------------------------------------------------------------------

def test_bundled_policy_loads_and_has_a_short_version():
    p = load_policy(RULES_DIR)
    ids = [r.id for r in p.rules]
    assert len(ids) == len(set(ids)) >= 10
    assert len(p.version) == 12 and int(p.version, 16) >= 0
    assert p.files == sorted(p.files) and "groups.yaml" not in p.files


def test_version_changes_with_content(tmp_path):
    d = write(tmp_path, {"a.yaml": rule()})
    v1 = load_policy(d).version
    assert load_policy(d).version == v1
    (d / "a.yaml").write_text(rule() + "  # a comment\n")
    assert load_policy(d).version != v1


def test_rule_file_may_be_a_list_or_a_rules_document(tmp_path):
    doc = "description: some rules\nrules:\n" + "\n".join("  " + line for line in rule("b").splitlines())
    p = load_policy(write(tmp_path, {"a.yaml": rule("a"), "b.yml": doc, "empty.yaml": ""}))
    assert [r.id for r in p.rules] == ["a", "b"]


def test_source_is_file_and_line_and_files_load_in_name_order(tmp_path):
    p = load_policy(write(tmp_path, {"20-z.yaml": rule("late"), "10-a.yaml": "# c\n\n" + rule("early")}))
    assert [(r.id, r.source) for r in p.rules] == [("early", "10-a.yaml:3"), ("late", "20-z.yaml:1")]


def test_disabled_rule_is_not_loaded(tmp_path):
    p = policy(tmp_path, rule("r-on") + rule("r-off", extra="  enabled: false\n"))
    assert [r.id for r in p.rules] == ["r-on"]


# --- checking: every error as file:line, all collected, nothing half-loaded --------------------------

def test_unknown_rule_key_says_which_keys_are_allowed(tmp_path):
    errs = errors_of(tmp_path, {"a.yaml": rule(extra="  severty: high\n")})
    assert len(errs) == 1
    assert errs[0].startswith("a.yaml:6: unknown key 'severty' in rule; allowed keys: id, title")


def test_unknown_condition_and_wrong_kind_of_condition(tmp_path):
    errs = errors_of(tmp_path, {"a.yaml": rule(match="keyword: [x]") + rule("r2", match="family: executable")})
    assert errs[0].startswith("a.yaml:7: unknown condition 'keyword'; allowed for message rules: protocol,")
    assert errs[1] == "a.yaml:14: condition 'family' applies to file rules, not message rules"


def test_bad_regex_reports_its_line(tmp_path):
    errs = errors_of(tmp_path, {"a.yaml": rule(match="regex:\n  - 'ok[0-9]+'\n  - 'bad(['")})
    assert len(errs) == 1 and errs[0].startswith("a.yaml:9: regex: bad regular expression 'bad(['")


def test_regex_matching_empty_text_is_refused(tmp_path):
    errs = errors_of(tmp_path, {"a.yaml": rule(match="regex: 'a*'")})
    assert "matches empty text" in errs[0]


@pytest.mark.parametrize("field,value,expected", [
    ("severity", "urgent", "a.yaml:3: severity: a string ('urgent') is not one of: info, low, medium, high, critical"),
    ("action", "drop", "a.yaml:4: action: a string ('drop') is not one of: allow, disclaim, alert, mask, warn, "
                       "quarantine, block"),
    ("applies_to", "files", "a.yaml:5: applies_to: a string ('files') is not one of: message, file"),
])
def test_bad_enum_values(tmp_path, field, value, expected):
    text = rule().replace(f"  {field}: ", f"  {field}: {value} #")
    assert expected in errors_of(tmp_path, {"a.yaml": text})


def test_bad_mode_and_direction(tmp_path):
    errs = errors_of(tmp_path, {"a.yaml": rule(extra="  mode: audit\n", match="direction: outward\nkeywords: x")})
    assert "a.yaml:6: mode: a string ('audit') is not one of: enforce, shadow" in errs
    assert "a.yaml:8: direction: 'outward' is not one of: inbound, outbound, internal, unknown" in errs


def test_duplicate_ids_across_files(tmp_path):
    errs = errors_of(tmp_path, {"a.yaml": rule("same"), "b.yaml": "\n" + rule("same")})
    assert errs == ["b.yaml:2: duplicate rule id 'same' (first defined at a.yaml:1)"]


def test_unknown_group_and_zone(tmp_path):
    errs = errors_of(tmp_path, {"a.yaml": rule(match="sender: group:finanse\nrecipient: zone:outside\nkeywords: x")})
    assert errs[0] == "a.yaml:7: sender: unknown group 'finanse' (groups defined in groups.yaml: finance)"
    assert errs[1] == "a.yaml:8: recipient: zone 'outside' is not one of: internal, external"


def test_yara_references_are_checked_when_rule_names_are_known(tmp_path):
    files = {"a.yaml": rule(applies_to="file", match="yara_rule: [EICAR_Test_File, Nope]\nyara_namespace: eicar")}
    assert load_policy(write(tmp_path, files))       # nothing known: not checked
    errs = errors_of(tmp_path, files, known_yara_rules={"EICAR_Test_File", "eicar.EICAR_Test_File"})
    assert errs == ["a.yaml:7: yara_rule: unknown YARA rule 'Nope' (not in the loaded signatures)"]
    errs = errors_of(tmp_path, files, known_yara_rules={"Nope", "EICAR_Test_File", "other.Nope"})
    assert errs == ["a.yaml:8: yara_namespace: unknown YARA namespace 'eicar' (loaded: other)"]


def test_yaml_syntax_error_and_tabs(tmp_path):
    errs = errors_of(tmp_path, {"a.yaml": rule() + "- id: [unclosed\n"})
    assert len(errs) == 1 and errs[0].startswith("a.yaml:8: YAML syntax error")
    errs = errors_of(tmp_path, {"a.yaml": "- id: r1\n\ttitle: x\n"})
    assert errs[0].startswith("a.yaml:2: YAML syntax error") and "tabs" in errs[0]


def test_weird_shapes_give_clear_errors(tmp_path):
    errs = errors_of(tmp_path, {"a.yaml": "- - id: x\n- just a string\n", "b.yaml": "id: r1\ntitle: t\n",
                                "c.yaml": rule(match="- keywords: x\n- 42"), "d.yaml": "rules: 7\n"})
    assert "a.yaml:1: a rule must be a mapping with keys id, title, severity, action, applies_to, match, ...; " \
           "got a list" in errs
    assert "a.yaml:2: a rule must be a mapping with keys id, title, severity, action, applies_to, match, ...; " \
           "got a string ('just a string')" in errs
    assert any(e.startswith("b.yaml:1: unknown top-level key 'id'") for e in errs)
    assert "c.yaml:8: match: expected a mapping of conditions (e.g. direction: outbound) or a list of such " \
           "mappings, got a number (42)" in errs
    assert "d.yaml:1: expected a list of rules, got a number (7)" in errs


def test_yaml_booleans_in_a_keyword_list_are_caught(tmp_path):
    errs = errors_of(tmp_path, {"a.yaml": rule(match="keywords: [yes, fine]")})
    assert errs == ["a.yaml:7: keywords: expected a string, got a boolean (true) "
                    "(quote it: YAML reads yes/no/on/off as booleans)"]


def test_duplicate_yaml_keys_are_an_error(tmp_path):
    errs = errors_of(tmp_path, {"a.yaml": rule(extra="  action: block\n")})
    assert errs[0].startswith("a.yaml:6: YAML syntax error: duplicate key 'action'")


def test_missing_keys_and_mask_checks(tmp_path):
    errs = errors_of(tmp_path, {"a.yaml": "- id: lonely\n  title: t\n",
                                "b.yaml": rule("m1", action="mask", applies_to="file", match="family: pdf"),
                                "c.yaml": rule("m2", action="mask", match="direction: outbound")})
    assert "a.yaml:1: rule lonely: missing required key 'severity'" in errs
    assert "b.yaml:4: action 'mask' only works on message rules (it rewrites text); use block or quarantine " \
           "for files" in errs
    assert any(e.startswith("c.yaml:4: action 'mask' needs a text condition") for e in errs)


def test_notify_placeholders_are_checked(tmp_path):
    errs = errors_of(tmp_path, {"a.yaml": rule(extra="  notify: 'Hi {sender}, {file.name} {__class__} {'\n")})
    assert errs[0].startswith("a.yaml:6: notify: unknown placeholder {file.name}; allowed: {reason}")
    assert errs[1].startswith("a.yaml:6: notify: unknown placeholder {__class__}")
    assert errs[2].startswith("a.yaml:6: notify: stray '{'")


def test_groups_file_errors(tmp_path):
    groups = "zones:\n  internal:\n    domains: [example.com]\n    networks: [10.0.0.0/33]\n" \
             "  dmz: {}\ngroups:\n  empty: []\n  nested: ['group:x']\nextra: 1\n"
    errs = errors_of(tmp_path, {"a.yaml": rule()}, groups=groups)
    assert any(e.startswith("groups.yaml:4: zones.internal.networks:") for e in errs)
    assert any(e.startswith("groups.yaml:5: zones: unknown zone 'dmz'") for e in errs)
    assert "groups.yaml:7: groups.empty: a group needs at least one member" in errs
    assert any(e.startswith("groups.yaml:8: groups.nested:") for e in errs)
    assert "groups.yaml:9: unknown key 'extra'; allowed keys: groups, zones" in errs


def test_all_errors_are_collected_and_a_broken_file_never_half_loads(tmp_path):
    d = write(tmp_path, {"a.yaml": rule("good"), "b.yaml": rule("bad1", action="nuke") + rule("bad2", match="x: 1")})
    with pytest.raises(PolicyError) as exc:
        load_policy(d)
    assert [e.split(":")[0] for e in exc.value.errors] == ["b.yaml", "b.yaml"]
    assert "2 error(s)" in str(exc.value)
    (d / "b.yaml").write_text(rule("fixed"))
    assert [r.id for r in load_policy(d).rules] == ["good", "fixed"]


def test_missing_rules_dir(tmp_path):
    with pytest.raises(PolicyError) as exc:
        load_policy(tmp_path / "nope")
    assert exc.value.errors[0].endswith(":1: not a folder of rule files")


# --- message conditions -------------------------------------------------------------------------------

def test_keywords_are_case_insensitive_on_word_boundaries(tmp_path):
    p = policy(tmp_path, rule(match="keywords: [Project Falcon, c++, merger]"))
    assert p.decide_message("about PROJECT   falcon today", OUT).action == "alert"
    assert p.decide_message("project falconry", OUT).action == "allow"
    assert p.decide_message("mergers", OUT).action == "allow"
    assert p.decide_message("I like C++.", OUT).action == "alert"
    d = p.decide_message("the Merger!", OUT)
    assert d.matches[0].reasons == ["text matched keyword 'merger'"]
    assert p.decide_message("about PROJECT   falcon", OUT).matches[0].reasons == \
        ["text matched keyword 'Project Falcon'"]


def test_a_keyword_list_is_one_precompiled_regex():
    from imguard.policy.loading import _Checker, _Compiler
    cond = _Compiler({}, None).condition(_Checker("x", []), "keywords", ["a", "B c", "d"], 1, "message")
    from imguard.policy.matcher import SPACE, WORD
    assert cond.regex.pattern == rf"(?i)(?:^|[^{WORD}])(?P<core>b[{SPACE}]+c|a|d)(?:[^{WORD}]|$)"    # one RE2


def test_keywords_with_text_whose_case_folding_changes_length(tmp_path):
    """'İ'.lower() is two characters: offsets would shift, so the exact regex is used on the original."""
    p = policy(tmp_path, rule("m", "mask", match="keywords: [falcon]"))
    assert p.decide_message("İİ FALCON İ falcon", OUT).masked_text == "İİ [REDACTED:keyword] İ [REDACTED:keyword]"
    assert p.decide_message("İİ FALCONs", OUT).action == "allow"


def test_a_failed_keyword_candidate_does_not_hide_a_shorter_keyword(tmp_path):
    p = policy(tmp_path, rule(match="keywords: ['top secret', 'top']"))
    assert p.decide_message("top secrets", OUT).matches[0].reasons == ["text matched keyword 'top'"]
    assert p.decide_message("topsecret", OUT).action == "allow"


def test_regex_condition_names_the_pattern_that_matched(tmp_path):
    p = policy(tmp_path, rule(match="regex: ['PRJ-[0-9]{4}', '(?i)^confidential']"))
    assert p.decide_message("see PRJ-1234", OUT).matches[0].reasons == ["text matched regex 'PRJ-[0-9]{4}'"]
    assert p.decide_message("Confidential: x", OUT).matches[0].reasons == ["text matched regex '(?i)^confidential'"]
    assert p.decide_message("prj-1234", OUT).action == "allow"


def test_conditions_are_anded_and_lists_are_ored(tmp_path):
    p = policy(tmp_path, rule(match="protocol: [irc, xmpp]\ndirection: outbound\nkeywords: secret"))
    assert p.decide_message("a secret", OUT).action == "alert"
    assert p.decide_message("a secret", OUT.with_(protocol="irc")).action == "alert"
    assert p.decide_message("a secret", OUT.with_(protocol="http")).action == "allow"
    assert p.decide_message("a secret", IN).action == "allow"
    assert p.decide_message("no", OUT).action == "allow"
    assert p.decide_message("a secret", OUT).matches[0].reasons == \
        ["protocol is xmpp", "direction is outbound", "text matched keyword 'secret'"]


def test_match_list_is_any_of_blocks_and_unless_is_an_exception(tmp_path):
    p = policy(tmp_path, rule(match="- {direction: outbound, keywords: alpha}\n- {direction: inbound, keywords: beta}",
                              extra="  unless:\n    recipient: '*@partner.org'\n"))
    assert p.decide_message("alpha", OUT).action == "alert"
    assert p.decide_message("beta", IN).action == "alert"
    assert p.decide_message("beta", OUT).action == "allow"
    assert p.decide_message("alpha", OUT.with_(recipients=("x@partner.org",))).action == "allow"


def test_detectors_in_rules_and_their_reasons(tmp_path):
    p = policy(tmp_path, rule(match="detect: [card, private_key, cloud_key]"))
    d = p.decide_message("card 4111 1111 1111 1111 and AKIAIOSFODNN7EXAMPLE", OUT)
    assert d.action == "alert"
    assert d.matches[0].reasons == ["text contains payment card number (detector card, 1 found)"]
    assert p.decide_message("4111 1111 1111 1112", OUT).action == "allow"


def test_sender_recipient_patterns_groups_domains_and_zones(tmp_path):
    p = policy(tmp_path, rule("fin", match="sender: group:finance\nkeywords: x")
               + rule("ext", match="recipient: zone:external\nkeywords: x")
               + rule("dom", match="recipient: ['domain:partner.org', 'ceo@example.com']\nkeywords: x"))
    ctx = ChatContext(sender="cfo@example.com/laptop", recipients=("carol@example.com",))
    assert p.decide_message("x", ctx).rule_ids == ["fin"]
    ctx = ChatContext(sender="dave@fin.example.com", recipients=("carol@example.com", "eve@sub.partner.org"))
    d = p.decide_message("x", ctx)
    assert d.rule_ids == ["fin", "ext", "dom"]
    assert d.matches[0].reasons[0] == "sender dave@fin.example.com matched 'group:finance'"
    assert d.matches[1].reasons[0] == "recipient eve@sub.partner.org matched 'zone:external'"
    assert p.decide_message("x", ChatContext(sender="a@example.com", recipients=("CEO@example.com",))).rule_ids \
        == ["dom"]


def test_direction_is_derived_from_zones_when_unknown(tmp_path):
    p = policy(tmp_path, rule("out", match="direction: outbound\nkeywords: x")
               + rule("unk", match="direction: unknown\nkeywords: x"))
    ctx = ChatContext(sender="alice@example.com", recipients=("bob@gmail.com",))
    d = p.decide_message("x", ctx)
    assert d.rule_ids == ["out"] and d.matches[0].reasons[0] == "direction is outbound (derived from zones)"
    assert p.classify_direction(ctx) == "outbound"
    assert p.decide_message("x", ChatContext(sender="alice", recipients=("#c",))).rule_ids == ["unk"]


def test_client_zone(tmp_path):
    p = policy(tmp_path, rule(match="client_zone: external\nkeywords: x"))
    assert p.decide_message("x", OUT.with_(client_address="203.0.113.9:4000")).action == "alert"
    assert p.decide_message("x", OUT.with_(client_address="10.2.3.4:4000")).action == "allow"


# --- actions, evaluation order, shadow, notices -------------------------------------------------------

def test_strongest_enforced_action_wins_and_all_rules_are_evaluated(tmp_path):
    p = policy(tmp_path, rule("a1", "alert") + rule("b1", "block") + rule("q1", "quarantine") + rule("a2", "alert"))
    d = p.decide_message("secret", OUT)
    assert d.action == "block" and d.rule_ids == ["a1", "b1", "q1", "a2"] and d.blocked
    assert d.severity == "medium"


def test_allow_ends_evaluation_but_earlier_rules_count(tmp_path):
    files = {"10.yaml": rule("early-block", "block", match="keywords: bad"),
             "20.yaml": rule("allow-partner", "allow", match="recipient: '*@partner.org'")
             + rule("late-block", "block") + rule("late-shadow", "block", extra="  mode: shadow\n")}
    p = load_policy(write(tmp_path, files))
    partner = OUT.with_(recipients=("x@partner.org",))
    d = p.decide_message("secret", partner)
    assert d.action == "allow" and d.rule_ids == ["allow-partner"] and d.shadow == []
    d = p.decide_message("bad secret", partner)
    assert d.action == "block" and d.rule_ids == ["early-block", "allow-partner"]
    d = p.decide_message("secret", OUT)
    assert d.action == "block" and d.rule_ids == ["late-block"] and [m.rule_id for m in d.shadow] == ["late-shadow"]


def test_shadow_rules_are_recorded_and_change_nothing(tmp_path):
    p = policy(tmp_path, rule("s-block", "block", extra="  mode: shadow\n")
               + rule("s-allow", "allow", extra="  mode: shadow\n") + rule("alert1", "alert"))
    d = p.decide_message("secret", OUT)
    assert d.action == "alert" and d.rule_ids == ["alert1"]
    assert [(m.rule_id, m.mode) for m in d.shadow] == [("s-block", "shadow"), ("s-allow", "shadow")]
    assert d.notice == "" and d.masked_text is None


def test_mask_rewrites_the_matched_spans(tmp_path):
    p = policy(tmp_path, rule("m-card", "mask", match="detect: card")
               + rule("m-word", "mask", match="keywords: [falcon]") + rule("a", "alert", match="keywords: zzz"))
    d = p.decide_message("Falcon: 4111 1111 1111 1111 and 5555-5555-5555-4444, falcon!", OUT)
    assert d.action == "mask"
    assert d.masked_text == "[REDACTED:keyword]: [REDACTED:card] and [REDACTED:card], [REDACTED:keyword]!"
    assert p.decide_message("nothing", OUT).masked_text is None


def test_mask_loses_to_block_and_shadow_mask_rewrites_nothing(tmp_path):
    p = policy(tmp_path, rule("m", "mask", match="detect: card") + rule("b", "block", match="keywords: stop")
               + rule("sm", "mask", match="keywords: falcon", extra="  mode: shadow\n"))
    d = p.decide_message("stop 4111 1111 1111 1111", OUT)
    assert d.action == "block" and d.masked_text is None
    d = p.decide_message("falcon 4111 1111 1111 1111", OUT)
    assert d.masked_text == "falcon [REDACTED:card]"


def test_quarantine_of_text_acts_like_block(tmp_path):
    d = policy(tmp_path, rule("q", "quarantine")).decide_message("secret", OUT)
    assert d.action == "quarantine" and d.blocked
    assert d.notice == "Your message was not delivered: it is held for review by the security team (Rule q)."


def test_notices(tmp_path):
    p = policy(tmp_path,
               rule("f-block", "block", applies_to="file", match="family: executable",
                    extra="  notify: 'Your file {file.name} ({file.size}) to {recipients} was {action}: {reason}. "
                          "{{{rule.id}}}'\n")
               + rule("f-silent", "block", applies_to="file", match="extension: scr")
               + rule("m-alert", "alert", extra="  notify: 'Careful, {sender}: {details}'\n"))
    d = p.decide_file(report("a.exe", family="executable", size=2048), OUT)
    assert d.notice == "Your file a.exe (2.0 KB) to bob@gmail.com was blocked: Rule f-block. {f-block}"
    assert d.matches[0].notice == d.notice
    d = p.decide_file(report("x.scr"), OUT)
    assert d.notice == "Your file x.scr was not delivered: it was blocked by the security policy (Rule f-silent)."
    d = p.decide_message("secret", OUT)
    assert d.notice == "Careful, alice@example.com: text matched keyword 'secret'"


def test_notice_values_from_the_wire_are_cleaned(tmp_path):
    p = policy(tmp_path, rule("f", "block", applies_to="file", match="family: executable",
                              extra="  notify: 'blocked {file.name}'\n"))
    d = p.decide_file(report("evil\n\x1b[31m\u202egpj.exe" + "A" * 300, family="executable"), OUT)
    assert "\n" not in d.notice and "\x1b" not in d.notice and "\u202e" not in d.notice
    assert len(d.notice) < 140


def test_a_file_without_a_name_leaves_no_double_space_in_its_notice(tmp_path):
    # SIP MESSAGE bodies and some DCC offers carry no file name: the bundled template must still read well.
    p = policy(tmp_path, rule("f", "block", applies_to="file", match="family: executable",
                              extra="  notify: 'Your file {file.name} was blocked: {reason}'\n"))
    assert p.decide_file(report("", family="executable"), OUT).notice == "Your file was blocked: Rule f"
    assert p.decide_file(report("a.exe", family="executable"), OUT).notice == "Your file a.exe was blocked: Rule f"


def test_policy_version_is_in_each_decision(tmp_path):
    p = policy(tmp_path, rule())
    assert p.decide_message("x", OUT).policy_version == p.version
    assert p.decide_file(report(), OUT).policy_version == p.version


def test_explain_lists_rules_and_reasons(tmp_path):
    p = policy(tmp_path, rule("r1", "block"))
    text = explain(p.decide_message("secret", OUT))
    assert "rule r1 [block, medium] at r.yaml:1: Rule r1" in text and "- text matched keyword 'secret'" in text


# --- file conditions ----------------------------------------------------------------------------------

def file_policy(tmp_path, match, **kw):
    return policy(tmp_path, rule("f", "block", applies_to="file", match=match), **kw)


def test_family_mime_and_extension_match_members_and_say_which(tmp_path):
    exe = report("x.exe", family="executable", mime="application/x-dosexec", depth=1, path="a.zip!x.exe")
    zipped = report("a.zip", family="archive", mime="application/zip", members=[exe])
    d = file_policy(tmp_path, "family: executable").decide_file(zipped, IN)
    assert d.action == "block" and d.matches[0].reasons == ["member a.zip!x.exe family executable"]
    assert file_policy(tmp_path, "mime: 'application/x-dos*'").decide_file(zipped, IN).matches[0].reasons == \
        ["member a.zip!x.exe mime application/x-dosexec"]
    assert file_policy(tmp_path, "extension: [.EXE]").decide_file(zipped, IN).action == "block"
    assert file_policy(tmp_path, "name: '*.zip'").decide_file(zipped, IN).matches[0].reasons == \
        ["file a.zip name matches a.zip"]
    assert file_policy(tmp_path, "family: pdf").decide_file(zipped, IN).action == "allow"


def test_unknown_family_is_refused_when_the_inspector_is_installed(tmp_path):
    pytest.importorskip("imguard.inspect.filetype")
    errs = errors_of(tmp_path, {"a.yaml": rule(applies_to="file", match="family: executables")})
    assert errs[0].startswith("a.yaml:7: family: 'executables' is not one of: executable,")


def test_type_mismatch_polyglot_encrypted(tmp_path):
    mism = report("a.pdf", findings=[Finding(TYPE_MISMATCH, "named .pdf but is a PE executable")])
    assert file_policy(tmp_path, "type_mismatch: true").decide_file(mism, IN).matches[0].reasons == \
        ["file a.pdf type mismatch (named .pdf but is a PE executable)"]
    assert file_policy(tmp_path, "type_mismatch: false").decide_file(mism, IN).action == "allow"
    assert file_policy(tmp_path, "type_mismatch: false").decide_file(report(), IN).matches[0].reasons == \
        ["no type mismatch"]
    poly = report("p.jpg", findings=[Finding(POLYGLOT, "zip appended")])
    assert file_policy(tmp_path, "polyglot: true").decide_file(poly, IN).action == "block"
    assert file_policy(tmp_path, "polyglot: true").decide_file(mism, IN).action == "allow"
    enc_member = report("a.zip", members=[report("s.doc", depth=1, path="a.zip!s.doc", encrypted=True)])
    assert file_policy(tmp_path, "encrypted: true").decide_file(enc_member, IN).matches[0].reasons == \
        ["member a.zip!s.doc is encrypted"]
    enc_finding = report("b.7z", findings=[Finding(ENCRYPTED, "encrypted container")])
    assert file_policy(tmp_path, "encrypted: true").decide_file(enc_finding, IN).action == "block"
    assert file_policy(tmp_path, "encrypted: true").decide_file(report(), IN).action == "allow"


def test_contains_executable_and_archive_depth(tmp_path):
    inner = report("x.exe", family="executable", depth=2, path="a.zip!b.zip!x.exe")
    nested = report("a.zip", members=[report("b.zip", depth=1, path="a.zip!b.zip", members=[inner])])
    assert file_policy(tmp_path, "contains_executable: true").decide_file(nested, IN).matches[0].reasons == \
        ["member a.zip!b.zip!x.exe family executable"]
    bare_exe = report("x.exe", family="executable")
    assert file_policy(tmp_path, "contains_executable: true").decide_file(bare_exe, IN).action == "allow"
    assert file_policy(tmp_path, "archive_depth_gt: 1").decide_file(nested, IN).matches[0].reasons == \
        ["archive depth 2 > 1 (member a.zip!b.zip!x.exe)"]
    assert file_policy(tmp_path, "archive_depth_gt: 2").decide_file(nested, IN).action == "allow"


def test_size_conditions_with_units(tmp_path):
    assert parse_size("10MB") == 10 * 1024 ** 2 and parse_size("1.5 kb") == 1536 and parse_size(512) == 512
    assert parse_size("10 parsecs") is None and parse_size(True) is None and parse_size(-1) is None
    big = report(size=11 * 1024 ** 2)
    assert file_policy(tmp_path, "size_gt: 10MB").decide_file(big, IN).matches[0].reasons == \
        [f"file size {11 * 1024 ** 2} bytes > 10MB"]
    assert file_policy(tmp_path, "size_gt: 10MB").decide_file(report(size=100), IN).action == "allow"
    assert file_policy(tmp_path, "size_lt: 1KB").decide_file(report(size=100), IN).action == "block"
    errs = errors_of(tmp_path, {"a.yaml": rule(applies_to="file", match="size_gt: lots")})
    assert errs[0].startswith("a.yaml:7: size_gt: expected a size like 512, 100KB, 10MB or 1GB")


def test_yara_conditions(tmp_path):
    f = yara("EICAR_Test_File", "eicar", tags=["Malware", "test"], meta={"severity": "high", "author": "x"})
    member = report("e.com", depth=1, path="a.zip!e.com", findings=[f])
    top = report("a.zip", members=[member])
    cases = {
        "yara_rule: EICAR_Test_File": "YARA rule EICAR_Test_File (namespace eicar) in member a.zip!e.com",
        "yara_rule: eicar.EICAR_Test_File": "YARA rule EICAR_Test_File (namespace eicar) in member a.zip!e.com",
        "yara_namespace: eicar": "YARA rule EICAR_Test_File (namespace eicar) in member a.zip!e.com",
        "yara_tag: [malware]": "YARA rule EICAR_Test_File (namespace eicar) in member a.zip!e.com tag malware",
        "yara_meta: {severity: [high, critical]}":
            "YARA rule EICAR_Test_File (namespace eicar) in member a.zip!e.com meta severity=high",
    }
    for match, reason in cases.items():
        d = file_policy(tmp_path, match).decide_file(top, IN)
        assert d.matches and d.matches[0].reasons == [reason], match
    for match in ("yara_rule: Other", "yara_rule: other.EICAR_Test_File", "yara_namespace: x", "yara_tag: pdf_active",
                  "yara_meta: {severity: low}", "yara_meta: {missing: x}"):
        assert file_policy(tmp_path, match).decide_file(top, IN).action == "allow", match
    top_level = report("e.com", findings=[f])
    assert file_policy(tmp_path, "yara_rule: EICAR_Test_File").decide_file(top_level, IN).matches[0].reasons == \
        ["YARA rule EICAR_Test_File (namespace eicar)"]


def test_yara_meta_numbers_globs_and_presence(tmp_path):
    """Public sets grade rules with numbers (signature-base `score = 80`, Elastic `severity = 100`, sometimes
    written as strings) and names (Elastic `threat_name`): compared as numbers, matched as globs, or just present."""
    def decide(match, meta):
        return file_policy(tmp_path, match).decide_file(report("x.bin", findings=[yara("R", meta=meta)]), IN)

    holds = [("yara_meta: {score: '>= 75'}", {"score": 80}),
             ("yara_meta: {score: '>= 75'}", {"score": 75}),
             ("yara_meta: {score: '>= 75'}", {"score": "90"}),
             ("yara_meta: {score: '>= 40 and < 75'}", {"score": 40}),
             ("yara_meta: {score: '> 40 AND <= 74.5'}", {"score": 74}),
             ("yara_meta: {score: ['< 10', '== 50']}", {"score": 50}),
             ("yara_meta: {score: '!= 0'}", {"score": 3}),
             ("yara_meta: {score: 80}", {"score": 80}),
             ("yara_meta: {score: 80}", {"score": "80"}),
             ("yara_meta: {threat_name: '*.trojan.*'}", {"threat_name": "Windows.Trojan.CobaltStrike"}),
             ("yara_meta: {threat_name: '*'}", {"threat_name": ""}),
             ("yara_meta: {category: malware, malware_type: ransomware}",
              {"category": "MALWARE", "malware_type": "RANSOMWARE"})]
    for match, meta in holds:
        assert decide(match, meta).action == "block", (match, meta)
    fails = [("yara_meta: {score: '>= 75'}", {"score": 74}),
             ("yara_meta: {score: '>= 75'}", {"score": "high"}),          # a word is no number
             ("yara_meta: {score: '>= 75'}", {"score": True}),
             ("yara_meta: {score: '>= 75'}", {}),                         # no score: no match
             ("yara_meta: {score: '>= 40 and < 75'}", {"score": 75}),
             ("yara_meta: {severity: '>= 75'}", {"severity": "critical"}),
             ("yara_meta: {threat_name: '*.trojan.*'}", {"threat_name": "Windows.Hacktool.X"}),
             ("yara_meta: {threat_name: '*'}", {"score": 1}),
             ("yara_meta: {category: malware, malware_type: ransomware}", {"category": "MALWARE"})]
    for match, meta in fails:
        assert decide(match, meta).action == "allow", (match, meta)
    reason = decide("yara_meta: {score: '>= 75'}", {"score": 80}).matches[0].reasons
    assert reason == ["YARA rule R (namespace ns) meta score=80"]


def test_yara_meta_comparison_errors_name_the_line(tmp_path):
    errs = errors_of(tmp_path, {"a.yaml": rule(applies_to="file", match="yara_meta: {score: '>= high'}")})
    assert errs == ["a.yaml:7: yara_meta.score: '>= high' is not a comparison like '>= 75' or '>= 40 and < 75' "
                    "(operators >= > <= < == !=, then a number)"]
    errs = errors_of(tmp_path, {"a.yaml": rule(applies_to="file", match="yara_meta: {score: '>= 40 or < 5'}")})
    assert len(errs) == 1 and "is not a comparison" in errs[0]
    errs = errors_of(tmp_path, {"a.yaml": rule(applies_to="file", match="yara_meta: [score]")})
    assert errs and "expected a mapping of meta key to value(s)" in errs[0]


def test_yara_rule_namespace_and_tag_globs(tmp_path):
    f = yara("MAL_Emotet_Loader_Jan25", "apt_emotet", tags=["Malicious"])
    top = report("x.bin", findings=[f])
    for match in ("yara_rule: 'MAL_*'", "yara_rule: 'mal_*'", "yara_rule: 'apt_*.MAL_*'", "yara_namespace: 'apt_*'",
                  "yara_tag: 'mal*'", "yara_rule: MAL_Emotet_Loader_Jan25"):
        assert file_policy(tmp_path, match).decide_file(top, IN).action == "block", match
    for match in ("yara_rule: 'SUSP_*'", "yara_rule: mal_emotet_loader_jan25", "yara_namespace: 'gen_*'",
                  "yara_tag: 'tc_*'"):
        assert file_policy(tmp_path, match).decide_file(top, IN).action == "allow", match
    # globs are not checked against the loaded names (they may match none yet); exact names are
    known = {"MAL_Emotet_Loader_Jan25", "apt_emotet.MAL_Emotet_Loader_Jan25"}
    assert file_policy(tmp_path, "yara_rule: 'HKTL_*'\nyara_namespace: 'x*'", known_yara_rules=known)


def test_yara_file_uses_where_the_signatures_define_each_rule(tmp_path):
    from imguard.inspect.signatures import RuleNames
    known = RuleNames({"R", "index.R", "Q", "index.Q"}, {"index.R": "malware/MALW_x.yar:3",
                                                       "index.Q": "utils/helpers.yar:9"})
    r, q = yara("R", "index"), yara("Q", "index")
    pol = file_policy(tmp_path, "yara_file: 'malware/*'", known_yara_rules=known)
    assert pol.decide_file(report("a", findings=[r]), IN).matches[0].reasons == \
        ["YARA rule R (namespace index) from malware/MALW_x.yar"]
    assert pol.decide_file(report("a", findings=[q]), IN).action == "allow"
    by_name = file_policy(tmp_path, "yara_file: helpers.yar", known_yara_rules=known)
    assert by_name.decide_file(report("a", findings=[q]), IN).action == "block"
    # without the signatures (rules explain), no rule is known to come from any file
    assert file_policy(tmp_path, "yara_file: 'malware/*'").decide_file(report("a", findings=[r]), IN).action == "allow"


def test_unscannable_and_reasons(tmp_path):
    r = report("big.zip", findings=[Finding(UNSCANNABLE, "inspection timed out after 5s", data={"reason": "timeout"})])
    d = file_policy(tmp_path, "unscannable: true").decide_file(r, IN)
    assert d.matches[0].reasons == [
        "file big.zip could not be fully inspected (timeout: inspection timed out after 5s)"]
    assert file_policy(tmp_path, "unscannable_reason: [timeout, corrupt]").decide_file(r, IN).action == "block"
    assert file_policy(tmp_path, "unscannable_reason: encrypted").decide_file(r, IN).action == "allow"
    assert file_policy(tmp_path, "unscannable: true").decide_file(report(), IN).action == "allow"
    assert file_policy(tmp_path, "finding: [unscannable]").decide_file(r, IN).action == "block"
    errs = errors_of(tmp_path, {"a.yaml": rule(applies_to="file", match="unscannable_reason: slow")})
    assert errs[0].startswith("a.yaml:7: unscannable_reason: 'slow' is not one of: timeout,")


def test_file_rules_do_not_apply_to_messages_and_back(tmp_path):
    p = policy(tmp_path, rule("m", "block", match="keywords: exe") + rule("f", "block", applies_to="file",
                                                                        match="extension: exe"))
    assert p.decide_message("exe", OUT).rule_ids == ["m"]
    assert p.decide_file(report("a.exe"), OUT).rule_ids == ["f"]


# --- odd input, limits, speed -------------------------------------------------------------------------

def test_odd_message_input_never_crashes(tmp_path):
    p = policy(tmp_path, rule(match="keywords: secret"))
    assert p.decide_message(None, OUT).action == "allow"
    assert p.decide_message(b"a secret \xff", OUT).action == "alert"
    assert p.decide_message(12345, OUT).action == "allow"
    assert p.decide_message(["secret"], OUT).action == "alert"
    assert p.decide_message("secret", None).action == "alert"
    assert p.decide_message("\udcff\x00 secret", OUT).action == "alert"


def test_text_beyond_the_scan_limit_is_not_scanned(tmp_path):
    d = write(tmp_path, {"a.yaml": rule("m", "mask", match="keywords: secret")})
    p = load_policy(d, limits=PolicyLimits(max_text_chars=100))
    text = "secret " + "x" * 200 + " secret"
    decision = p.decide_message(text, OUT)
    assert decision.masked_text == "[REDACTED:keyword] " + "x" * 200 + " secret"
    assert p.decide_message("x" * 200 + " secret", OUT).action == "allow"
    assert PolicyLimits().max_text_chars == 1024 * 1024


def test_huge_text_is_bounded_in_time():
    p = load_policy(RULES_DIR)
    text = "4111 " * 400_000 + "AKIA" * 200_000      # 2.8 MB of near-misses
    start = time.perf_counter()
    p.decide_message(text, OUT)
    assert time.perf_counter() - start < 5.0


def test_rules_left_out_by_context_would_not_have_matched():
    """decide_message evaluates only the rules whose context conditions can pass for the message's context
    (remembered per context): for every context and text, the decision is the one evaluating every rule."""
    from imguard.policy import conditions
    folders = [RULES_DIR, Path(__file__).resolve().parent / "data" / "rules"]
    texts = ["hello", "card 4111 1111 1111 1111 please", "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n",
             "AKIAIOSFODNN7EXAMPLE key", "project zeus budget", "?OTR:AAMD", ""]
    contexts = [OUT, IN, INT, ChatContext(), ChatContext(protocol="irc", sender="nick", recipients=("#ops",)),
                ChatContext(protocol="xmpp", sender="alice@example.com", recipients=("bob@gmail.com", "x@example.com")),
                ChatContext(protocol="http", direction="outbound", sender="cfo@example.com", recipients=("a@b.c",),
                            client_address="10.1.2.3:5555", server_address="8.8.8.8:443")]
    policies = [load_policy(folder) for folder in folders]
    for policy in policies:
        compared = 0
        for ctx in contexts:
            for text in texts:
                fast = policy.decide_message(text, ctx)
                every, _ = policy._decide(policy.message_rules, conditions.Evaluation(ctx, policy.zones, text=text),
                                          "message", {})
                assert (fast.action, fast.rule_ids, [m.rule_id for m in fast.shadow], fast.notice) == \
                       (every.action, every.rule_ids, [m.rule_id for m in every.shadow], every.notice), (ctx, text)
                compared += 1
        assert compared == len(contexts) * len(texts)
    bundled = policies[0]           # its rules are about outbound traffic: an internal chat skips them
    assert len(bundled._message_candidates(INT)) < len(bundled.message_rules)


# --- end-to-end encryption (the `encrypted` condition of message rules) -----------------------------------

def test_encrypted_condition_sees_the_scheme_the_session_recognised(tmp_path):
    p = policy(tmp_path, rule("any", match="encrypted: true") + rule("clear", match="encrypted: false")
               + rule("otr", action="block", match="encrypted: [otr, openpgp]")
               + rule("megolm", match="encrypted: megolm"))
    ctx = ChatContext(protocol="xmpp", direction="outbound", sender="alice@example.com")
    plain = p.decide_message("", ctx)
    assert plain.rule_ids == ["clear"] and plain.action == "alert"
    omemo = p.decide_message("", ctx.with_(encryption="omemo"))
    assert omemo.rule_ids == ["any"] and omemo.matches[0].reasons == ["the message is end-to-end encrypted (omemo)"]
    otr = p.decide_message("?OTR:AAMD", ctx.with_(encryption="otr"))
    assert otr.action == "block" and sorted(otr.rule_ids) == ["any", "otr"]
    assert sorted(p.decide_message("", ctx.with_(encryption="megolm")).rule_ids) == ["any", "megolm"]
    # A marker in a message sent in clear is text, not a fact: only the session says what is encrypted.
    assert p.decide_message("?OTR:AAMDJ+MVmSfjFZcAAAAAAQ== -----BEGIN PGP MESSAGE-----", ctx).rule_ids == ["clear"]


def test_encrypted_condition_combines_with_the_others_and_prunes_by_context(tmp_path):
    p = policy(tmp_path, rule("out", action="block", match="encrypted: true\ndirection: outbound"))
    out = ChatContext(protocol="xmpp", direction="outbound", encryption="openpgp")
    assert p.decide_message("", out).action == "block"
    assert p.decide_message("", out.with_(direction="inbound")).action == "allow"
    assert p.decide_message("", out.with_(encryption="")).action == "allow"
    assert p._message_candidates(out.with_(encryption="")) == []       # decided by the context alone


def test_encrypted_condition_errors_name_file_and_line(tmp_path):
    errs = errors_of(tmp_path, {"a.yaml": rule("a", match="regex: x\nencrypted: [omemo, signal]"),
                                "b.yaml": rule("b", match="encrypted: {scheme: otr}"),
                                "c.yaml": rule("c", match="encrypted: 'yes'"),
                                "d.yaml": rule("d", match="encrypted: []")})
    assert "a.yaml:8: encrypted: 'signal' is not one of: omemo, openpgp, otr, megolm, matrix-attachment" in errs
    assert ("b.yaml:7: encrypted: expected true, false or a list of schemes (omemo, openpgp, otr, megolm, "
            "matrix-attachment), got a mapping") in errs
    assert "c.yaml:7: encrypted: 'yes' is not one of: omemo, openpgp, otr, megolm, matrix-attachment" in errs
    assert "d.yaml:7: encrypted: the list is empty (give at least one value)" in errs


def test_a_file_rule_encrypted_is_still_the_files_own(tmp_path):
    p = policy(tmp_path, rule("f", applies_to="file", match="encrypted: true"))
    assert p.decide_file(report("a.zip", encrypted=True), ChatContext(encryption="")).action == "alert"
    assert p.decide_file(report("a.txt"), ChatContext(encryption="omemo")).action == "allow"


def test_the_bundled_rule_alerts_on_encrypted_messages_by_the_fact_not_the_text():
    p = load_policy(Path(__file__).parent.parent / "rules")
    ctx = ChatContext(protocol="xmpp", direction="outbound", sender="alice@example.com", recipients=("bob@gmail.com",))
    for scheme in ("omemo", "openpgp", "otr", "megolm"):
        d = p.decide_message("", ctx.with_(encryption=scheme))
        assert d.action == "alert" and "e2e-encrypted-content" in d.rule_ids, scheme
    assert "e2e-encrypted-content" not in p.decide_message("I sent you an OMEMO encrypted message", ctx).rule_ids
