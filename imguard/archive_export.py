"""Exports for e-discovery and archive vendors: EML (one message per conversation and UTC day, as archive vendors
ingest chat) and RSMF 2.0.0 (Relativity Short Message Format: an RFC 5322 message with X-RSMF-* headers carrying
rsmf.zip, which holds rsmf_manifest.json and the attachments). Files a record names are attached when the
quarantine still holds their bytes (blocked files); the others are listed with their name, size and SHA-256.

Incremental: with a cursor file, an export takes the records stored after the last one the previous export took
(the archive's `id`) and writes the new cursor once its documents are written. A day exported in two runs yields two
documents (the second with the records added since). In SQLite, ids follow commit order; in a PostgreSQL archive
shared by several gateways a transaction that commits late can hold an id below the cursor, so an incremental export
of a shared archive should trail the present (`--until` a minute ago).
"""

from __future__ import annotations

import dataclasses
import email.policy
import email.utils
import hashlib
import io
import json
import re
import zipfile
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Iterable, Iterator

from imguard import archive as archive_module
from imguard.policy.zones import parse_identity

FORMATS = ("eml", "rsmf")
RSMF_VERSION = "2.0.0"
PAGE = 1000
# CRLF, lines up to RFC 5322's limit of 998: a long subject is not folded in front of its first word.
_POLICY = email.policy.SMTP.clone(max_line_length=998)


@dataclasses.dataclass
class ExportResult:
    documents: int = 0          # files written
    messages: int = 0
    files: int = 0              # file records
    attached: int = 0           # of which the bytes were attached
    conversations: int = 0
    cursor: int = 0             # the last record id exported
    paths: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "paths"}


def records_after(store: archive_module.Archive, query: archive_module.Query, cursor: int) -> Iterator[dict]:
    """The records `query` selects, stored after record `cursor`, in id order (paged)."""
    while True:
        page = store.search(dataclasses.replace(query, after_id=cursor, limit=PAGE))
        yield from page
        if len(page) < PAGE:
            return
        cursor = page[-1]["id"]


def conversation_key(record: dict) -> str:
    """The conversation a record belongs to: its `conversation`, else its parties (bare, sorted)."""
    if record.get("conversation"):
        return record["conversation"]
    people = {parse_identity(p).bare for p in [record.get("sender") or "", *(record.get("recipients") or "").split()]
              if p}
    return " & ".join(sorted(people)) or "(unknown)"


def group_by_conversation_day(records: Iterable[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """(protocol, conversation, UTC day) -> its records in order."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for record in records:
        day = (record.get("time") or "")[:10]
        groups.setdefault((record.get("protocol") or "", conversation_key(record), day), []).append(record)
    return groups


def _safe_name(text: str, limit: int = 80) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", text)[:limit].strip("_") or "conversation"


def _address(identity: str) -> str:
    """An identity as a mail address header value (a chat id is not always an address: kept in the name)."""
    bare = parse_identity(identity).bare
    if re.fullmatch(r"[^@\s<>\"]+@[^@\s<>\"]+", bare):
        return email.utils.formataddr((identity, bare))
    return email.utils.formataddr((identity, "unknown@invalid"))


def _line(record: dict) -> str:
    clock = (record.get("time") or "")[11:19]
    who = record.get("sender") or "?"
    action = record.get("action") or ""
    mark = "" if action == "allow" else f" [{action}{': ' + record['rules'] if record.get('rules') else ''}]"
    if record.get("kind") == "file":
        return (f"{clock} {who}: [file {record.get('file_name')!s} {record.get('file_size')} bytes "
                f"sha256 {record.get('sha256')}]{mark}")
    text = record.get("text")
    return f"{clock} {who}: {text if text is not None else '(text not kept)'}{mark}"


def quarantined_file(record: dict, quarantine: Any) -> bytes | None:
    sha256 = record.get("sha256") or ""
    if quarantine is None or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        return None
    try:
        data = quarantine.read(sha256)
    except (OSError, ValueError):
        return None
    return data if hashlib.sha256(data).hexdigest() == sha256 else None


def eml_document(key: tuple[str, str, str], records: list[dict], quarantine: Any) -> tuple[EmailMessage, int]:
    """One conversation-day as a message; (message, attachments)."""
    protocol, conversation, day = key
    senders = list(dict.fromkeys(r.get("sender") or "" for r in records if r.get("sender")))
    others = list(dict.fromkeys(p for r in records for p in (r.get("recipients") or "").split()
                                if p not in senders))
    message = EmailMessage(policy=_POLICY)
    message["From"] = _address(senders[0]) if senders else "imguard <unknown@invalid>"
    message["To"] = ", ".join(_address(p) for p in (senders[1:] + others)) or "undisclosed-recipients:;"
    message["Subject"] = f"{protocol} conversation {conversation} on {day}"
    first = records[0].get("time") or ""
    try:
        import datetime
        message["Date"] = email.utils.format_datetime(datetime.datetime.fromisoformat(first))
    except ValueError:
        pass
    digest = hashlib.sha256(f"{protocol}\0{conversation}\0{day}\0{records[0]['id']}".encode()).hexdigest()[:32]
    message["Message-ID"] = f"<{digest}@imguard.invalid>"
    message["X-Imguard-Protocol"] = protocol
    message["X-Imguard-Conversation"] = conversation
    message["X-Imguard-Records"] = f"{records[0]['id']}-{records[-1]['id']}"
    message.set_content("\n".join(_line(r) for r in records) + "\n", charset="utf-8")
    attached = 0
    for record in records:
        if record.get("kind") == "file" and (data := quarantined_file(record, quarantine)) is not None:
            message.add_attachment(data, maintype="application", subtype="octet-stream",
                                   filename=_safe_name(record.get("file_name") or record["sha256"], 120))
            attached += 1
    return message, attached


def rsmf_manifest(key: tuple[str, str, str], records: list[dict], quarantine: Any
                  ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The RSMF 2.0.0 manifest of one conversation-day and the files for rsmf.zip (name -> bytes)."""
    protocol, conversation, day = key
    participants: dict[str, str] = {}          # identity -> participant id

    def participant(identity: str) -> str:
        if identity not in participants:
            participants[identity] = f"P{len(participants) + 1}"
        return participants[identity]

    for record in records:
        for identity in [record.get("sender") or "", *(record.get("recipients") or "").split()]:
            if identity:
                participant(identity)
    files: dict[str, bytes] = {}
    events = []
    for record in records:
        event: dict[str, Any] = {"id": f"r{record['id']}", "type": "message", "conversation": "C1",
                                 "timestamp": record.get("time") or "",
                                 "custom": [{"name": name, "value": str(record[column])}
                                            for name, column in (("imguard action", "action"),
                                                                 ("imguard rules", "rules"),
                                                                 ("imguard direction", "direction"))
                                            if record.get(column)]}
        if not event["custom"]:
            del event["custom"]
        if record.get("sender"):
            event["participant"] = participant(record["sender"])
        if record.get("direction") in ("inbound", "outbound"):
            event["direction"] = "incoming" if record["direction"] == "inbound" else "outgoing"
        if record.get("kind") == "file":
            event["body"] = f"[file {record.get('file_name')} sha256 {record.get('sha256')}]"
            data = quarantined_file(record, quarantine)
            if data is not None:
                name = f"{record['sha256'][:16]}_{_safe_name(record.get('file_name') or 'file', 60)}"
                files[name] = data
                event["attachments"] = [{"id": name, "display": record.get("file_name") or name,
                                         "size": len(data)}]
        else:
            event["body"] = record.get("text") if record.get("text") is not None else "(text not kept)"
        events.append(event)
    manifest = {
        "version": RSMF_VERSION,
        "participants": [{"id": pid, "display": identity, "account_id": identity}
                         for identity, pid in participants.items()],
        "conversations": [{"id": "C1", "display": f"{conversation} ({day})", "platform": protocol or "unknown",
                           "type": "channel" if conversation.startswith(("#", "&", "!")) or "@conference." in
                           conversation else "direct", "participants": list(participants.values())}],
        "events": events,
        "eventcollectionid": hashlib.sha256(f"{protocol}\0{conversation}".encode()).hexdigest()[:32],
    }
    return manifest, files


def rsmf_document(key: tuple[str, str, str], records: list[dict], quarantine: Any) -> tuple[EmailMessage, int]:
    """An .rsmf file: an RFC 5322 message with the X-RSMF headers and rsmf.zip attached."""
    manifest, files = rsmf_manifest(key, records, quarantine)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("rsmf_manifest.json", json.dumps(manifest, ensure_ascii=False, indent=1))
        for name, data in files.items():
            zipped.writestr(name, data)
    message, _ = eml_document(key, records, None)
    message["X-RSMF-Version"] = RSMF_VERSION
    message["X-RSMF-Generator"] = "imguard"
    message["X-RSMF-EventCount"] = str(len(manifest["events"]))
    message["X-RSMF-BeginDate"] = records[0].get("time") or ""
    message["X-RSMF-EndDate"] = records[-1].get("time") or ""
    message.add_attachment(buffer.getvalue(), maintype="application", subtype="zip", filename="rsmf.zip")
    return message, len(files)


def export(store: archive_module.Archive, query: archive_module.Query, fmt: str, out_dir: Path,
           quarantine: Any = None, cursor_path: Path | None = None) -> ExportResult:
    """Write one document per conversation-day of the records `query` selects (after the cursor's record) into
    out_dir; then move the cursor."""
    if fmt not in FORMATS:
        raise ValueError(f"export format is one of {', '.join(FORMATS)}, not {fmt!r}")
    cursor = 0
    if cursor_path is not None and cursor_path.exists():
        cursor = int(json.loads(cursor_path.read_text()).get("after_id", 0))
    result = ExportResult(cursor=cursor)
    records = list(records_after(store, query, cursor))
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_by_conversation_day(records)
    conversations = set()
    for key, group in sorted(groups.items(), key=lambda item: (item[0][2], item[0][0], item[0][1])):
        make = eml_document if fmt == "eml" else rsmf_document
        message, attached = make(key, group, quarantine)
        protocol, conversation, day = key
        name = f"{day}_{_safe_name(protocol, 20)}_{_safe_name(conversation)}_{group[0]['id']}.{fmt}"
        path = out_dir / name
        path.write_bytes(message.as_bytes())
        result.paths.append(str(path))
        result.documents += 1
        result.attached += attached
        conversations.add((protocol, conversation))
    result.conversations = len(conversations)
    result.messages = sum(1 for r in records if r.get("kind") == "message")
    result.files = sum(1 for r in records if r.get("kind") == "file")
    if records:
        result.cursor = max(r["id"] for r in records)
    if cursor_path is not None:
        cursor_path.write_text(json.dumps({"after_id": result.cursor}) + "\n")
    return result
