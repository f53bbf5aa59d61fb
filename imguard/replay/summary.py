"""What a replay found: the summary of one capture (conversations, messages, transfers, anomalies), as
`imguard pcap` prints it (format_text) or writes it (to_dict, JSON)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Conversation:
    conn: int
    client: str
    server: str
    protocol: str = ""              # xmpp, irc, dcc, tls, http, socks5, "" (unknown)
    detected_by: str = ""
    midstream: bool = False
    encrypted: bool = False         # TLS from the first byte, or after STARTTLS
    bytes_from_client: int = 0
    bytes_from_server: int = 0
    forwarded_to_server: int = 0    # what the session let through (Send), which may differ from what came
    forwarded_to_client: int = 0
    encrypted_bytes: int = 0        # bytes after TLS started, not decoded
    undecoded_bytes: int = 0        # bytes after the session closed or after a gap on their side
    gaps: int = 0
    gap_bytes: int = 0
    closed_by: str = ""             # "fin", "rst", "end of capture"
    session_closed: str = ""        # the reason of the session's Close, if it closed the connection

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Message:
    conn: int
    ts: float
    protocol: str
    sender: str
    recipients: list[str]
    conversation: str
    text: str
    action: str
    rules: list[str]
    direction: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Transfer:
    conn: int
    ts: float
    mechanism: str
    name: str
    size: int
    sha256: str
    mime: str                       # true type (libmagic)
    claimed_mime: str
    action: str                     # the verdict; "" when the file could not be inspected at all
    rules: list[str]
    truncated: bool = False
    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)     # "kind: detail"
    detail: str = ""
    stored: str = ""                # where --out saved it (files/<2 hex>/<sha256>), "" if not saved

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Anomaly:
    conn: int                       # 0: about the capture, not a connection
    ts: float
    source: str                     # capture, reassembly, replay, session
    kind: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ReplaySummary:
    capture: str
    stats: dict[str, Any] = field(default_factory=dict)
    conversations: list[Conversation] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)

    @property
    def blocked(self) -> bool:
        return any(m.action in ("block", "quarantine") for m in self.messages) or \
            any(t.action in ("block", "quarantine") for t in self.transfers)

    def to_dict(self) -> dict[str, Any]:
        return {"capture": self.capture, "stats": self.stats,
                "conversations": [c.to_dict() for c in self.conversations],
                "messages": [m.to_dict() for m in self.messages],
                "transfers": [t.to_dict() for t in self.transfers],
                "anomalies": [a.to_dict() for a in self.anomalies]}

    def format_text(self) -> str:
        lines = [f"{self.capture}: {self.stats.get('frames', 0)} frames, {self.stats.get('tcp', 0)} TCP, "
                 f"{len(self.conversations)} connections"]
        for c in self.conversations:
            flags = [f for f, on in (("midstream", c.midstream), ("encrypted", c.encrypted)) if on]
            if c.gaps:
                flags.append(f"{c.gaps} gaps/{c.gap_bytes} B")
            lines.append(f"  conn C{c.conn:<3} {c.protocol or '?':10} {c.client} -> {c.server}  "
                         f"{c.bytes_from_client}/{c.bytes_from_server} B  {' '.join(flags)}".rstrip())
        for m in self.messages:
            rules = f" [{', '.join(m.rules)}]" if m.rules else ""
            lines.append(f"  msg  C{m.conn:<3} {m.action.upper():10} {m.sender or '?'} -> "
                         f"{', '.join(m.recipients) or '?'}: {m.text!r}{rules}")
        for t in self.transfers:
            rules = f" [{', '.join(t.rules)}]" if t.rules else ""
            trunc = " TRUNCATED" if t.truncated else ""
            lines.append(f"  file C{t.conn:<3} {(t.action or 'n/a').upper():10} {t.name!r} {t.size} B {t.mime} "
                         f"sha256={t.sha256} via {t.mechanism}{trunc}{rules}")
        for a in self.anomalies:
            where = f"C{a.conn}" if a.conn else "capture"
            lines.append(f"  weird {where:5} {a.source}/{a.kind}: {a.detail}")
        return "\n".join(lines)
