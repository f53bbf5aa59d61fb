"""The policy engine: declarative YAML rules (rules/*.yaml) -> a Decision for each message and file.

    policy = load_policy(Path("rules"), known_yara_rules=signatures.rule_names)
    decision = policy.decide_message(text, ctx)      # or policy.decide_file(report, ctx)

docs/rules.md is the manual for policy authors.
"""

from imguard.policy.detectors import DETECTORS, Span, detect
from imguard.policy.engine import Policy, PolicyError, PolicyLimits, Rule, explain, mask_text, parse_size
from imguard.policy.loading import load_policy, rule_files
from imguard.policy.testing import CaseResult, run_rule_tests
from imguard.policy.zones import Zones, classify_direction

__all__ = ["CaseResult", "DETECTORS", "Policy", "PolicyError", "PolicyLimits", "Rule", "Span", "Zones",
           "classify_direction", "detect", "explain", "load_policy", "mask_text", "parse_size", "rule_files",
           "run_rule_tests"]
