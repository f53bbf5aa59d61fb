"""The one place events are written: JSON lines, one object per decision, anomaly or record.

Field names follow the Elastic Common Schema where one exists (`@timestamp`, `event.*`, `rule.*`,
`file.*`, `source.*`, `destination.*`, `observer.*`); imguard's own facts live under `imguard.*`.
Every line is handed to the kernel with one O_APPEND write before write() returns, so it survives a
crash of the gateway process; lines of kind "alert" are also fsync'ed, so they survive a crash of
the machine. (Plain events, such as an allowed chat message, skip the fsync: it costs milliseconds.)
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any

from imguard.model import ALLOW, ChatContext, Decision, FileReport

OBSERVER = {"product": "imguard", "vendor": "imguard", "type": "ids", "hostname": socket.gethostname()}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _address(value: str) -> dict[str, Any]:
    host, _, port = value.rpartition(":")
    if not host:
        return {"address": value}
    return {"address": host.strip("[]"), "ip": host.strip("[]"), "port": int(port) if port.isdigit() else port}


def _base(kind: str, category: str, ctx: ChatContext, action: str = "", outcome: str = "") -> dict[str, Any]:
    event: dict[str, Any] = {
        "@timestamp": _now(),
        "event": {"kind": kind, "category": [category], "module": "imguard", "dataset": f"imguard.{category}"},
        "observer": dict(OBSERVER),
        "network": {"protocol": ctx.protocol} if ctx.protocol else {},
        "imguard": {"context": ctx.to_dict()},
    }
    if action:
        event["event"]["action"] = action
    if outcome:
        event["event"]["outcome"] = outcome
    if ctx.client_address:
        event["source"] = _address(ctx.client_address)
    if ctx.server_address:
        event["destination"] = _address(ctx.server_address)
    if ctx.sender:
        event["source"] = {**event.get("source", {}), "user": {"name": ctx.sender}}
    return event


def _decision_fields(event: dict[str, Any], decision: Decision) -> None:
    event["event"]["action"] = decision.action
    event["event"]["kind"] = "event" if decision.action == ALLOW and not decision.matches else "alert"
    event["event"]["type"] = ["denied"] if decision.blocked else ["allowed"]
    if decision.severity:
        event["event"]["severity_name"] = decision.severity
    if decision.matches:
        event["rule"] = {"id": decision.rule_ids[0] if len(decision.matches) == 1 else decision.rule_ids,
                         "name": [m.title for m in decision.matches]}
    event["imguard"]["decision"] = decision.to_dict()


def message_event(text: str | None, ctx: ChatContext, decision: Decision) -> dict[str, Any]:
    """A chat message and what policy did with it. `text` is None when policy says not to keep it."""
    event = _base("event", "message", ctx)
    _decision_fields(event, decision)
    if text is not None:
        event["imguard"]["message"] = {"text": text}
    return event


def file_event(report: FileReport, ctx: ChatContext, decision: Decision) -> dict[str, Any]:
    """A file transfer: its facts, what inspection found and what policy did."""
    event = _base("event", "file", ctx)
    _decision_fields(event, decision)
    event["file"] = {
        "name": report.name, "size": report.size, "mime_type": report.mime,
        "hash": {"sha256": report.sha256, "sha1": report.sha1, "md5": report.md5},
    }
    event["imguard"]["report"] = report.to_dict()
    return event


def anomaly_event(ctx: ChatContext, kind: str, detail: str, **data: Any) -> dict[str, Any]:
    """A protocol anomaly (Zeek's 'weird'): malformed or suspicious traffic, logged, never a crash."""
    event = _base("alert", "anomaly", ctx, action="anomaly")
    event["imguard"]["anomaly"] = {"kind": kind, "detail": detail, **data}
    return event


class AlertLog:
    """Appends events as JSON lines to one file. Safe to call from several threads."""

    def __init__(self, path: Path, instance: str = ""):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.instance = instance or socket.gethostname()
        self._lock = threading.Lock()
        # O_APPEND: every line lands whole at the end, even with several gateway processes.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def write(self, event: dict[str, Any]) -> None:
        event.setdefault("observer", dict(OBSERVER))["name"] = self.instance
        line = (json.dumps(event, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
            if event.get("event", {}).get("kind") == "alert":
                os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
