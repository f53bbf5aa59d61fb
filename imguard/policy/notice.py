"""In-band notice templates: `Your file {file.name} was blocked: {reason}`.

A template is plain text with `{placeholder}` fields from a fixed set; `{{` and `}}` are literal
braces. Nothing is evaluated: no attribute access, no format specs, no expressions. Values that come
from the wire (file names, identities) are stripped of control characters and cut to
MAX_VALUE_CHARS, because the notice goes back into the chat.
"""

from __future__ import annotations

import re

MAX_VALUE_CHARS = 120

COMMON_PLACEHOLDERS = {
    "reason": "the rule's title (why, in words for the sender)",
    "details": "the matched conditions, in words ('text matched keyword ...; ...')",
    "rule.id": "the rule id",
    "rule.title": "the rule title",
    "severity": "the rule severity",
    "action": "what happened, as a verb: blocked, quarantined, held, redacted, flagged, allowed",
    "sender": "the sender's identity",
    "recipients": "the recipients, comma separated",
    "protocol": "the protocol (xmpp, irc, ...)",
    "direction": "inbound, outbound, internal or unknown",
}
FILE_PLACEHOLDERS = {
    "file.name": "the file name the sender gave",
    "file.size": "the file size, human readable (2.5 MB)",
    "file.mime": "the file's true type",
    "file.sha256": "the file's SHA-256",
}
ACTION_WORDS = {"allow": "allowed", "disclaim": "disclaimed", "alert": "flagged", "mask": "redacted", "warn": "held",
                "quarantine": "quarantined", "block": "blocked"}

_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_EMPTY = "\x00"         # marks an empty field while rendering (clean() strips NUL from every value)
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029\u202a-\u202e\u2066-\u2069]+")


def check_template(template: str, applies_to: str) -> list[str]:
    """Problems with a template (unknown placeholders, stray braces), as messages."""
    allowed = dict(COMMON_PLACEHOLDERS)
    if applies_to == "file":
        allowed.update(FILE_PLACEHOLDERS)
    problems = []
    for m in _FIELD.finditer(template):
        token = m.group()
        if token in ("{{", "}}"):
            continue
        if m.group(1) is None:
            problems.append(f"notify: stray {token!r} (write {token * 2} for a literal brace)")
        elif m.group(1).strip() not in allowed:
            problems.append(f"notify: unknown placeholder {{{m.group(1)}}}; allowed: "
                            + ", ".join("{" + k + "}" for k in allowed))
    return problems


def clean(value: object) -> str:
    text = _CONTROL.sub(" ", str(value)).strip()
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS - 1] + "…"


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return str(size)


def render(template: str, values: dict[str, object]) -> str:
    """Fill `template` (already checked) with `values`; unknown fields render as empty text."""
    def sub(m: re.Match) -> str:
        token = m.group()
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        if m.group(1) is None:
            return token
        return clean(values.get(m.group(1).strip(), "")) or _EMPTY
    # An empty field between two spaces (a file sent without a name: "Your file {file.name} was blocked")
    # leaves one space, not two.
    return _FIELD.sub(sub, template).replace(f" {_EMPTY} ", " ").replace(_EMPTY, "")
