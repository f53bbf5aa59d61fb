"""The shared vocabulary of imguard: who is talking (ChatContext), what was found in a file
(FileReport, Finding) and what policy decided (Decision, RuleMatch).

Every stage speaks these types: protocol sessions build a ChatContext, the inspector returns a
FileReport, the policy returns a Decision, and the alert writer serialises all three. They are plain
data with no behaviour beyond walking and serialising, so the offline replay and the inline gateway
produce identical records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

# Direction of a conversation relative to the company, as policy sees it.
OUTBOUND = "outbound"   # an internal person to an external contact or server
INBOUND = "inbound"     # an external contact to an internal person
INTERNAL = "internal"   # both sides internal
UNKNOWN = ""            # not yet known (e.g. `imguard scan` without context)
DIRECTIONS = (OUTBOUND, INBOUND, INTERNAL)

# Which side of the intercepted connection the content came from (ChatContext.origin): the topology that
# decides direction when the zones do not know a party. The client side is behind the gateway: inside.
FROM_CLIENT = "client"  # sent by the user behind the gateway
FROM_SERVER = "server"  # delivered to the user behind the gateway
ORIGINS = (FROM_CLIENT, FROM_SERVER)


@dataclass(frozen=True)
class ChatContext:
    """Who sent what to whom, over which protocol: everything policy and alerts need to know
    about the conversation a message or file belongs to."""

    protocol: str = ""                  # "xmpp", "irc", "http", ... ("" for a file given to `imguard scan`)
    direction: str = UNKNOWN            # OUTBOUND, INBOUND, INTERNAL or UNKNOWN
    sender: str = ""                    # the authenticated identity: a bare JID, nick!user@host, ...
    recipients: tuple[str, ...] = ()    # people or rooms the content is addressed to
    conversation: str = ""              # room, channel or thread id, when there is one
    client_address: str = ""            # "ip:port" of the chat client
    server_address: str = ""            # "ip:port" of the server it talks to
    connection_id: str = ""             # the gateway's id of the connection
    transfer_mechanism: str = ""        # for files: "xep-0363", "ibb", "socks5", "dcc", "upload", ""
    origin: str = ""                    # FROM_CLIENT, FROM_SERVER, or "" (not known: `imguard scan`)
    encryption: str = ""                # a message's end-to-end encryption, one of ENCRYPTION_SCHEMES; "" in clear
    tenant: str = ""                    # chat APIs: the workspace, instance or tenant the call goes to ("" unknown)

    def with_(self, **changes: Any) -> "ChatContext":
        # Called per message by some sessions: copying the fields is several times cheaper than
        # dataclasses.replace (which runs __init__); anything unusual still goes through replace.
        if type(self) is not ChatContext or not changes.keys() <= _CONTEXT_FIELDS:
            return dataclasses.replace(self, **changes)
        copy = object.__new__(ChatContext)
        fields = copy.__dict__
        fields.update(self.__dict__)
        fields.update(changes)
        return copy

    def to_dict(self) -> dict[str, Any]:
        # Written for every chat message: a plain dict is several times cheaper than dataclasses.asdict.
        return {"protocol": self.protocol, "direction": self.direction, "sender": self.sender,
                "recipients": list(self.recipients), "conversation": self.conversation,
                "client_address": self.client_address, "server_address": self.server_address,
                "connection_id": self.connection_id, "transfer_mechanism": self.transfer_mechanism,
                "origin": self.origin, "encryption": self.encryption, "tenant": self.tenant}


_CONTEXT_FIELDS = frozenset(f.name for f in dataclasses.fields(ChatContext))

# End-to-end encryption schemes a session recognises on a message it cannot read (ChatContext.encryption; the
# policy condition `encrypted`). "matrix-attachment": a Matrix EncryptedFile shared in a message sent in clear.
ENCRYPTION_SCHEMES = ("omemo", "openpgp", "otr", "megolm", "matrix-attachment")


# Finding kinds. A finding is a fact the inspector established, not a verdict: policy decides.
YARA_MATCH = "yara"                 # data: rule, namespace, tags, meta
TYPE_MISMATCH = "type_mismatch"     # data: claimed_extension, claimed_mime, detected_mime, detected_family
ENCRYPTED = "encrypted"             # an encrypted archive member, or an encrypted container
POLYGLOT = "polyglot"               # data: format, trailing_offset, trailing_bytes, trailing_type
LIMIT_HIT = "limit"                 # data: setting, value: an archive or size limit was reached
UNSAFE_PATH = "unsafe_path"         # an archive member name with ../ or an absolute path
UNSCANNABLE = "unscannable"         # data: reason. The content could not be fully inspected; never clean.
ENGINE_MATCH = "engine"             # data: engine ("clamav", "icap"), signature: an external engine's detection

FINDING_KINDS = (YARA_MATCH, TYPE_MISMATCH, ENCRYPTED, POLYGLOT, LIMIT_HIT, UNSAFE_PATH, UNSCANNABLE, ENGINE_MATCH)

# Reasons given with an UNSCANNABLE finding.
REASON_TIMEOUT = "timeout"
REASON_TOO_LARGE = "too_large"
REASON_LIMIT = "limit"
REASON_CORRUPT = "corrupt"
REASON_ENCRYPTED = "encrypted"
REASON_SCANNER_ERROR = "scanner_error"
REASON_UNREADABLE = "unreadable"
REASON_TRUNCATED = "truncated"
REASON_UNSUPPORTED = "unsupported"  # a container the inspector does not open (WIM, CHM, VHD, ...): members unseen
UNSCANNABLE_REASONS = (REASON_TIMEOUT, REASON_TOO_LARGE, REASON_LIMIT, REASON_CORRUPT, REASON_ENCRYPTED,
                       REASON_SCANNER_ERROR, REASON_UNREADABLE, REASON_TRUNCATED, REASON_UNSUPPORTED)


@dataclass
class Finding:
    kind: str                               # one of FINDING_KINDS
    detail: str                             # one human sentence
    path: str = ""                          # archive path of the file it is about ("" = the file itself)
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FileReport:
    """What inspection established about one file or archive member."""

    name: str                   # the claimed name (from the wire, or the member name); never used as a path
    path: str                   # where it sits: "outer.zip!inner.zip!evil.exe"; the name itself at the top
    size: int
    sha256: str = ""
    sha1: str = ""
    md5: str = ""
    mime: str = ""              # true type, from libmagic on the content
    description: str = ""       # libmagic's text description
    family: str = ""            # type family, see imguard.inspect.filetype.FAMILIES
    extension: str = ""         # the claimed extension, lower case, without the dot
    claimed_mime: str = ""      # the MIME type the sender declared, if any
    depth: int = 0              # 0 for the file itself, 1 for a member of it, ...
    encrypted: bool = False
    findings: list[Finding] = field(default_factory=list)
    members: list["FileReport"] = field(default_factory=list)
    # Each external engine that ran on the file (ClamAV, ICAP): engine, verdict ("clean", "detected",
    # "unscannable") and detail, what it answered in words ("clamav: scanned clean by clamd at ... (ClamAV 1.4.6/...)").
    engine_verdicts: list[dict[str, str]] = field(default_factory=list)

    def walk(self) -> Iterator["FileReport"]:
        """This report and every member report below it, depth first."""
        yield self
        for member in self.members:
            yield from member.walk()

    def all_findings(self) -> Iterator[Finding]:
        for report in self.walk():
            yield from report.findings

    @property
    def unscannable_reasons(self) -> list[str]:
        return [f.data.get("reason", "") for f in self.all_findings() if f.kind == UNSCANNABLE]

    @property
    def yara_matches(self) -> list[Finding]:
        return [f for f in self.all_findings() if f.kind == YARA_MATCH]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d


# Actions, weakest first. The decision's action is the strongest action of the enforced rules that matched.
ALLOW = "allow"
DISCLAIM = "disclaim"   # not an enforcement: a notice to both parties on first contact (Decision.disclaimers)
ALERT = "alert"
MASK = "mask"
WARN = "warn"           # held until the sender justifies it in the chat (imguard/conversation.py); else as BLOCK
QUARANTINE = "quarantine"
BLOCK = "block"
ACTIONS = (ALLOW, DISCLAIM, ALERT, MASK, WARN, QUARANTINE, BLOCK)

ENFORCE = "enforce"
SHADOW = "shadow"
MODES = (ENFORCE, SHADOW)

SEVERITIES = ("info", "low", "medium", "high", "critical")


@dataclass
class RuleMatch:
    rule_id: str
    action: str
    severity: str
    mode: str                                         # ENFORCE or SHADOW
    title: str = ""
    reasons: list[str] = field(default_factory=list)  # each matched condition, in words (for --explain)
    notice: str = ""                                  # the rendered in-band notice for the sender, if any
    source: str = ""                                  # "file:line" of the rule

    def to_dict(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict costs several microseconds, and a decision is written per message.
        return {"rule_id": self.rule_id, "action": self.action, "severity": self.severity, "mode": self.mode,
                "title": self.title, "reasons": list(self.reasons), "notice": self.notice, "source": self.source}


@dataclass
class Decision:
    """What policy decided about one message or file, and why."""

    action: str = ALLOW
    matches: list[RuleMatch] = field(default_factory=list)   # enforced rules that matched, in evaluation order
    shadow: list[RuleMatch] = field(default_factory=list)    # shadow-mode rules that matched (change nothing)
    masked_text: str | None = None                           # the rewritten text when action is MASK
    notice: str = ""                                         # the notice to send the sender ("" = none)
    policy_version: str = ""
    # `disclaim` rules that matched (never in `matches`: they change nothing about the message); the pipeline keeps
    # those due now for this pair of parties (imguard/conversation.py FirstContacts), the session injects them
    disclaimers: list[RuleMatch] = field(default_factory=list)
    # the enforced rules that matched and send the item to the console's review queue (`review: true`, supervision)
    review: list[str] = field(default_factory=list)

    @property
    def blocked(self) -> bool:
        """Not delivered as it is. WARN counts: a carrier that cannot hold a message for the sender's justification
        (only the XMPP and IRC sessions can, imguard/conversation.py) refuses it, fail closed."""
        return self.action in (BLOCK, QUARANTINE, WARN)

    @property
    def rule_ids(self) -> list[str]:
        return [m.rule_id for m in self.matches]

    @property
    def refusal(self) -> str:
        """What a refused client is told in an HTTP error or API error body: the policy notice, else the rule ids,
        else the action."""
        return self.notice or (", ".join(self.rule_ids) if self.rule_ids else self.action)

    @property
    def severity(self) -> str:
        ranks = [SEVERITIES.index(m.severity) for m in self.matches if m.severity in SEVERITIES]
        return SEVERITIES[max(ranks)] if ranks else ""

    def to_dict(self) -> dict[str, Any]:
        # By hand, as RuleMatch.to_dict: the same dict as dataclasses.asdict, in a fraction of the time.
        return {"action": self.action, "matches": [m.to_dict() for m in self.matches] if self.matches else [],
                "shadow": [m.to_dict() for m in self.shadow] if self.shadow else [], "masked_text": self.masked_text,
                "notice": self.notice, "policy_version": self.policy_version,
                # Rare, so only when there are some: every event carries a decision.
                **({"disclaimers": [m.to_dict() for m in self.disclaimers]} if self.disclaimers else {}),
                **({"review": list(self.review)} if self.review else {})}
