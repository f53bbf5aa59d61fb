"""The one place events are written: JSON lines, one object per decision, anomaly or record.

Field names follow the Elastic Common Schema (ECS_VERSION; `@timestamp`, `event.*`, `rule.*`, `file.*`,
`source.*`, `destination.*`, `user.*`, `related.*`, `observer.*`, `message`), with ECS's types and allowed
values (tests/test_ecs.py checks every event the test suite writes against the schema's own data);
imguard's own facts live under `imguard.*`. docs/events.md documents every field.
Every line is handed to the kernel with one O_APPEND write before write() returns, so it survives a
crash of the gateway process; lines of kind "alert" are also fsync'ed, so they survive a crash of
the machine. (Plain events, such as an allowed chat message, skip the fsync: it costs milliseconds.)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import hashlib
import ipaddress
import itertools
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import orjson

from imguard import __version__
from imguard.model import ALLOW, DIRECTIONS, ENGINE_MATCH, SEVERITIES, YARA_MATCH, ChatContext, Decision, FileReport

# The ECS release whose field definitions the events follow (`ecs.version`): the one tests/test_ecs.py reads.
ECS_VERSION = "9.5.0-dev"
OBSERVER = {"product": "imguard", "vendor": "imguard", "type": "ids", "hostname": socket.gethostname(),
            "version": __version__}

# ECS `event.severity` is numeric; imguard's scale is the rank of the severity name (higher is worse).
SEVERITY_NUMBER = {name: rank + 1 for rank, name in enumerate(SEVERITIES)}   # info=1 ... critical=5


# A random prefix per process and a counter: unique across gateways and restarts like a uuid4, without
# the urandom call per event (this runs for every chat message).
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def new_event_id() -> str:
    """`event.id`: unique per event, so a receiver can recognise a re-delivered (possible duplicate) event."""
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


def severity_of(event: dict[str, Any]) -> str:
    """The severity name of an event ("" when it has none). Also reads `event.severity_name`, where events
    written before imguard.severity (still queued for a sink, say) kept it."""
    return event.get("imguard", {}).get("severity") or event.get("event", {}).get("severity_name", "")


def _set_severity(event: dict[str, Any], severity: str) -> None:
    if severity:
        event["imguard"]["severity"] = severity
        event["event"]["severity"] = SEVERITY_NUMBER.get(severity, 0)


# (second, "YYYY-MM-DDTHH:MM:SS") of the last timestamp made: every event of the same second reuses it.
# One tuple, swapped whole, so threads never see a second paired with another second's text.
_timestamp_second: tuple[int, str] = (-1, "")
# ".000Z" ... ".999Z": looked up, since formatting the milliseconds ({:03d}) costs more than the rest of _now.
_MILLISECOND_SUFFIXES = tuple(f".{millisecond:03d}Z" for millisecond in range(1000))


def utc_now(suffixes: tuple[str, ...] = _MILLISECOND_SUFFIXES) -> str:
    """Now in UTC, ISO 8601 to the second, then suffixes[millisecond] (".443Z" by default; the archive's
    spell the offset "+00:00"). What datetime.isoformat gives, milliseconds truncated; formatting the date
    costs microseconds and it changes once a second."""
    global _timestamp_second
    second, millisecond = divmod(time.time_ns() // 1_000_000, 1000)
    cached_second, text = _timestamp_second
    if second != cached_second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _timestamp_second = (second, text)
    return text + suffixes[millisecond]


def _now() -> str:
    """`@timestamp`: "2026-11-27T05:40:16.443Z"."""
    return utc_now()


# The replay's clock: while set, events are stamped once, where they are built, with the capture's time
# (`@timestamp`, as Zeek logs packet time) and the time imguard wrote them (`event.created`). A context
# variable: the replay runs sessions and pipeline in its own thread; the gateway never sets it.
_capture_clock: contextvars.ContextVar[Callable[[], float] | None] = contextvars.ContextVar(
    "imguard_capture_clock", default=None)


@contextlib.contextmanager
def capture_time(clock: Callable[[], float]) -> Iterator[None]:
    """Events built inside carry clock()'s time (seconds since the epoch; 0: not known yet, now is used)."""
    token = _capture_clock.set(clock)
    try:
        yield
    finally:
        _capture_clock.reset(token)


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(
        timespec="microseconds").replace("+00:00", "Z")


# "ip:port" -> its ECS fields. A connection's two addresses come with every one of its messages; parsing
# them once per address, not per event, saves a microsecond a message. Bounded: emptied when full.
_parsed_addresses: dict[str, dict[str, Any]] = {}
_PARSED_ADDRESSES_MAX = 4096


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _address(value: str) -> dict[str, Any]:
    """"ip:port", "[v6]:port", "name:port" or a bare address -> ECS `address` and `ip` (an IP only) or
    `domain` (a host name), and `port` (a number only)."""
    parsed = _parsed_addresses.get(value)
    if parsed is None:
        host, _, port = value.rpartition(":")
        if not host or (not value.startswith("[") and ":" in host):      # no port, or a bare IPv6 address
            host, port = value, ""
        host = host.strip("[]")
        parsed = {"address": host}
        if _is_ip(host):
            parsed["ip"] = host
        elif host:
            parsed["domain"] = host
        if port.isdigit() and int(port) <= 65535:
            parsed["port"] = int(port)
        if len(_parsed_addresses) >= _PARSED_ADDRESSES_MAX:
            _parsed_addresses.clear()
        _parsed_addresses[value] = parsed
    return parsed.copy()        # the event's own: callers add "user" to it


def _base(kind: str, dataset: str, ctx: ChatContext, categories: list[str], types: list[str],
          action: str = "", outcome: str = "") -> dict[str, Any]:
    """The fields every event has. `categories` and `types`: ECS `event.category` and `event.type`, each type
    one that ECS expects for one of the categories (tests/test_ecs.py checks it)."""
    fields = {"id": new_event_id(), "kind": kind, "category": categories, "type": types, "module": "imguard",
              "dataset": f"imguard.{dataset}"}
    if action:
        fields["action"] = action
    if outcome:
        fields["outcome"] = outcome
    timestamp = _now()
    clock = _capture_clock.get()
    if clock is not None and (seconds := clock()):
        fields["created"], timestamp = timestamp, _iso(seconds)
    network: dict[str, Any] = {"protocol": ctx.protocol} if ctx.protocol else {}
    if ctx.direction in DIRECTIONS:               # outbound, inbound, internal: ECS's words too
        network["direction"] = ctx.direction
    event: dict[str, Any] = {
        "@timestamp": timestamp,
        "ecs": {"version": ECS_VERSION},
        "event": fields,
        "observer": OBSERVER.copy(),
        "network": network,
        "imguard": {"context": ctx.to_dict()},
    }
    related: dict[str, list[str]] = {}
    sender, recipients = ctx.sender, ctx.recipients
    if sender:
        event["user"] = {"name": sender}
        related["user"] = [sender, *recipients] if recipients else [sender]
    elif recipients:
        related["user"] = list(recipients)
    if len(related.get("user", ())) > 1:
        related["user"] = list(dict.fromkeys(related["user"]))
    ips = []
    if ctx.client_address or sender:
        source = _address(ctx.client_address) if ctx.client_address else {}
        if sender:
            source["user"] = {"name": sender}
        event["source"] = source
        if "ip" in source:
            ips.append(source["ip"])
    if ctx.server_address or recipients:
        destination = _address(ctx.server_address) if ctx.server_address else {}
        if recipients:
            destination["user"] = {"name": list(recipients)}
        event["destination"] = destination
        if "ip" in destination and destination["ip"] not in ips:
            ips.append(destination["ip"])
    if ips:
        related["ip"] = ips
    if related:
        event["related"] = related
    return event


# (sender, recipients) -> _who's text: a conversation's messages share it. Bounded: emptied when full.
_who_texts: dict[tuple[str, Any], str] = {}


def _who(ctx: ChatContext) -> str:
    """" from alice to bob, room" for a `message`: names from the wire, made one line and cut short."""
    key = (ctx.sender, ctx.recipients)
    try:
        text = _who_texts.get(key)
    except TypeError:                          # recipients given as a list
        key, text = None, None
    if text is None:
        text = ""
        if ctx.sender:
            text += f" from {_one_line(ctx.sender)}"
        if ctx.recipients:
            text += (" to " + _one_line(", ".join(map(str, ctx.recipients[:5])))
                     + (" and others" if len(ctx.recipients) > 5 else ""))
        if key is not None:
            if len(_who_texts) >= _PARSED_ADDRESSES_MAX:
                _who_texts.clear()
            _who_texts[key] = text
    return text


def _one_line(value: Any, limit: int = 200) -> str:
    text = " ".join(str(value).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _decision_fields(event: dict[str, Any], decision: Decision) -> None:
    fields = event["event"]
    matches, shadow = decision.matches, decision.shadow
    fields["action"] = decision.action
    fields["kind"] = "event" if decision.action == ALLOW and not matches else "alert"
    fields["type"].append("denied" if decision.blocked else "allowed")
    if fields["kind"] == "alert":            # an enforced rule matched: what an IDS reports
        fields["category"].append("intrusion_detection")
    if matches or shadow:        # an allowed message matches no rule: it skips all of this
        _set_severity(event, decision.severity)
        if matches:
            event["rule"] = {"id": matches[0].rule_id if len(matches) == 1 else decision.rule_ids,
                             "name": [m.title for m in matches]}
        else:
            # Only shadow rules matched: the event stays an event, but names them (mode says they changed nothing).
            event["rule"] = {"id": [m.rule_id for m in shadow], "name": [m.title for m in shadow]}
        modes = sorted({m.mode for m in matches + shadow if m.mode})
        if modes:
            event["imguard"]["mode"] = modes[0] if len(modes) == 1 else modes
    if decision.policy_version:
        if "rule" in event:
            event["rule"]["version"] = decision.policy_version
        else:
            event["rule"] = {"version": decision.policy_version}
    event["imguard"]["decision"] = decision.to_dict()
    if decision.review:             # supervision: the console's review queue takes it (imguard/console/review.py)
        event["imguard"]["review"] = {"rules": list(decision.review), "status": "pending"}


def message_event(text: str | None, ctx: ChatContext, decision: Decision) -> dict[str, Any]:
    """A chat message and what policy did with it. `text` is None when policy says not to keep it."""
    event = _base("event", "message", ctx, ["network"], [])
    _decision_fields(event, decision)
    event["message"] = f"{decision.action}: {ctx.protocol or 'chat'} message{_who(ctx)}" + _rules_named(event)
    if text is not None:
        digest = hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()
        event["imguard"]["message"] = {"text": text, "sha256": digest}
    return event


def membership_event(kind: str, ctx: ChatContext, decision: Decision, room: str = "") -> dict[str, Any]:
    """One person letting another into a conversation (`kind` "invite": ctx.sender invites ctx.recipients into
    `room`), decided by an ethical wall: `event.action` is `wall_<kind>`, the decision under imguard.decision."""
    event = _base("event", "session", ctx, ["network"], [])
    _decision_fields(event, decision)
    event["event"]["action"] = f"wall_{kind}"
    event["imguard"]["membership"] = {"kind": kind, "room": room, "action": decision.action}
    event["message"] = (f"{decision.action}: {ctx.protocol or 'chat'} {kind}{_who(ctx)}"
                        + (f" into {_one_line(room)}" if room else "") + _rules_named(event))
    return event


def file_event(report: FileReport, ctx: ChatContext, decision: Decision) -> dict[str, Any]:
    """A file transfer: its facts, what inspection found and what policy did."""
    event = _base("event", "file", ctx, ["file", "network"], ["info"])
    _decision_fields(event, decision)
    event["file"] = {
        "name": report.name, "size": report.size, "mime_type": report.mime,
        "hash": {"sha256": report.sha256, "sha1": report.sha1, "md5": report.md5},
    }
    if report.extension:
        event["file"]["extension"] = report.extension
    event["imguard"]["file"] = {
        "archive_path": report.path, "claimed_mime": report.claimed_mime, "family": report.family,
        "description": report.description, "encrypted": report.encrypted,
        "members": sum(1 for _ in report.walk()) - 1,
    }
    # Every YARA match in the file or any archive member, flat: what a SIEM rule filters on.
    yara = []
    for member in report.walk():
        for finding in member.findings:
            if finding.kind == YARA_MATCH:
                yara.append({"rule": finding.data.get("rule", ""), "namespace": finding.data.get("namespace", ""),
                             "tags": list(finding.data.get("tags", [])), "archive_path": finding.path or member.path})
    # What the external engines (ClamAV, ICAP) detected in the file.
    engines = [{"engine": f.data.get("engine", ""), "signature": f.data.get("signature", "")}
               for f in report.findings if f.kind == ENGINE_MATCH]
    if engines:
        event["imguard"]["engines"] = engines
    if yara or engines:
        if yara:
            event["imguard"]["yara"] = yara
        if event["event"]["kind"] == "alert":     # an enforced rule matched a file a signature matched
            event["event"]["category"].append("malware")
    event["imguard"]["report"] = report.to_dict()
    hashes = [h for h in (report.sha256, report.sha1, report.md5) if h]
    if hashes:
        event.setdefault("related", {})["hash"] = hashes
    event["message"] = (f"{decision.action}: {ctx.protocol or 'chat'} file {_one_line(report.name)!r} "
                        f"({report.size} bytes, {report.mime or 'unknown type'}){_who(ctx)}" + _rules_named(event))
    return event


def _rules_named(event: dict[str, Any]) -> str:
    names = [name for name in event.get("rule", {}).get("name", ()) if name]
    return f" ({_one_line('; '.join(names))})" if names and event["event"]["kind"] == "alert" else ""


# imguard.<category> of a protocol event -> ECS event.category: a login, a nick change, a session set up
# (session); a file offered, refused or expected (file). Each with event.type "info".
_PROTOCOL_CATEGORIES = {"session": ["session"], "file": ["file"]}


def protocol_event(protocol: str, action: str, ctx: ChatContext, category: str = "session",
                   **data: Any) -> dict[str, Any]:
    """Something a protocol session saw that is worth a record but is not a decision: a login, a nick
    change, a file offer, a link. `data` goes under imguard.<protocol>."""
    event = _base("event", category, ctx, list(_PROTOCOL_CATEGORIES.get(category, ["network"])), ["info"],
                  action=action)
    event["network"]["protocol"] = protocol
    event["imguard"][protocol] = data
    event["message"] = f"{protocol} {action}{_who(ctx)}"
    return event


def link_event(ctx: ChatContext, url: str) -> dict[str, Any]:
    """A file offered as a link (XEP-0066 out-of-band data): recorded, an event, not an alert."""
    event = _base("event", "file", ctx, ["file"], ["info"], action="link")
    _set_severity(event, "low")
    event["imguard"]["link"] = {"kind": "oob_link", "detail": "a file offered as a link", "url": url}
    event["url"] = {"original": url}
    event["message"] = f"{ctx.protocol or 'chat'}: a file offered as a link{_who(ctx)}: {_one_line(url)}"
    return event


def notify_event(connection_id: str, protocol: str, ctx: ChatContext, text: str,
                 decision: Decision | None = None, **data: Any) -> dict[str, Any]:
    """A request to tell a person something in their chat: the carrier finds the session of connection
    `connection_id` and carries out `session.notice(text)` there (a file blocked on a side connection,
    such as DCC, OFT, MSNFTP, MSRP or a SOCKS5 bytestream, is explained on the chat connection)."""
    event = _base("event", "file", ctx, ["file"], ["info"], action="notify")
    event["network"]["protocol"] = protocol
    event["message"] = f"{protocol} notice{_who(ctx)}: {_one_line(text)}"
    event["imguard"]["notify"] = {"connection_id": connection_id, "protocol": protocol, "text": text}
    event["imguard"].update(data)
    if decision is not None:
        event["imguard"]["decision"] = {"action": decision.action, "rule_ids": decision.rule_ids}
    return event


def anomaly_event(ctx: ChatContext, kind: str, detail: str, severity: str | None = None,
                  **data: Any) -> dict[str, Any]:
    """A protocol anomaly (Zeek's 'weird'): malformed or suspicious traffic, logged, never a crash.
    `severity` (default "low") is the event's; when given it is also kept in imguard.anomaly.severity."""
    event = _base("alert", "anomaly", ctx, ["network", "intrusion_detection"], ["info"], action="anomaly")
    event["message"] = f"{ctx.protocol or 'protocol'} anomaly {kind}: {_one_line(detail, 500)}"
    _set_severity(event, severity or "low")
    event["imguard"]["anomaly"] = {"kind": kind, "detail": detail, **data}
    if severity is not None:
        event["imguard"]["anomaly"]["severity"] = severity
    return event


def tls_failure_event(ctx: ChatContext, detail: str, side: str = "client", **data: Any) -> dict[str, Any]:
    """TLS interception failed: a client refused the gateway's certificate (pinning, CA not installed), or the
    real server's certificate did not verify. `side` is "client" or "server"."""
    event = _base("alert", "tls", ctx, ["network"], ["connection"], action="tls_interception_failed",
                  outcome="failure")
    event["message"] = f"TLS interception failed ({side} side){_who(ctx)}: {_one_line(detail, 500)}"
    _set_severity(event, "medium" if side == "server" else "low")
    event["imguard"]["tls"] = {"side": side, "detail": detail, **data}
    return event


def policy_reload_event(version: str, ok: bool, errors: list[str] | tuple[str, ...] = (), source: str = "",
                        rules: int | None = None) -> dict[str, Any]:
    """The policy was reloaded (ok) or a reload was refused, the old policy staying in force (errors)."""
    event = _base("event" if ok else "alert", "policy", ChatContext(), ["configuration"], ["change"],
                  action="policy_reload", outcome="success" if ok else "failure")
    event["message"] = (f"policy {version} in force" if ok else
                        f"policy reload refused ({len(errors)} problems), {version} stays in force")
    if not ok:
        _set_severity(event, "high")
    event["rule"] = {"version": version}
    event["imguard"]["policy"] = {"version": version, "source": source, "errors": list(errors)}
    if rules is not None:
        event["imguard"]["policy"]["rules"] = rules
    return event


def sink_failure_event(sink: str, kind: str, detail: str, severity: str = "medium", **data: Any) -> dict[str, Any]:
    """An event sink failed: it is down (events wait in its queue), its queue overflowed (events dropped for
    that sink, still in the local file), or its queue file was corrupt (the damaged records skipped)."""
    event = _base("alert", "sink", ChatContext(), ["host"], ["info"], action=f"sink_{kind}", outcome="failure")
    event["message"] = f"sink {sink}: {_one_line(detail, 500)}"
    _set_severity(event, severity)
    event["imguard"]["sink"] = {"name": sink, "kind": kind, "detail": detail, **data}
    return event


# Datetimes and dataclasses go to `default` (str), as with json.dumps, rather than orjson's own rendering.
_ORJSON_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
# Keys that are not strings (json.dumps writes 1 as "1"): a retry only, the option doubles orjson's time.
_ORJSON_OPTIONS_ANY_KEYS = _ORJSON_OPTIONS | orjson.OPT_NON_STR_KEYS

# Line breaks to str.splitlines() (and to readers built on it) that JSON may leave raw inside a string, and
# orjson does: it escapes only the characters below U+0020. In UTF-8 these bytes can only be these
# characters, so replacing them in the output bytes is safe.
_RAW_LINE_BREAKS = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"), (b"\xc2\x85", b"\\u0085"))


def encode(event: dict[str, Any]) -> bytes:
    """One event as one line: compact UTF-8 JSON, every control character (newline included) and every other
    character str.splitlines() breaks at (U+0085, U+2028, U+2029) escaped, so text from the wire can never
    start a new line or a fake record."""
    # orjson: a ~1 KB message event in 1-3 us instead of 15-20 with json.dumps (one per chat message).
    try:
        line = orjson.dumps(event, default=str, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        try:
            line = orjson.dumps(event, default=str, option=_ORJSON_OPTIONS_ANY_KEYS)
        except orjson.JSONEncodeError:
            # What orjson refuses and json takes: integers beyond 64 bits, lone surrogates (text decoded
            # with surrogateescape), nesting deeper than 254. json.dumps escapes everything non-ASCII.
            return (json.dumps(event, separators=(",", ":"), default=str) + "\n").encode()
    return _escape_raw_line_breaks(line)


def _escape_raw_line_breaks(line: bytes) -> bytes:
    """orjson's output with U+2028, U+2029 and U+0085 escaped (see _RAW_LINE_BREAKS)."""
    # isascii is a fraction of a microsecond; a substring search over the line costs a few.
    if not line.isascii() and (b"\xe2\x80" in line or b"\xc2\x85" in line):
        for raw, escaped in _RAW_LINE_BREAKS:
            line = line.replace(raw, escaped)
    return line


# --- the line of a plain message, from cached fragments ---------------------------------------------------
# An allowed chat message that matched no rule is most of the log, and its line differs from the last one of
# the same conversation only in @timestamp, event.id, the text and its sha256. AlertLog.write_message joins
# those four into fragments cut, once per (context object, observer name, policy version), from the line the
# general path writes for that context, so the bytes are the general path's by construction.

# Stand-ins put in the template event where the varying values go. A per-process random part, so that text
# from the wire cannot contain one by chance or on purpose (and a template where one occurs twice is refused).
_MARK = f"imguard-{os.urandom(8).hex()}"
_TIMESTAMP_MARK, _ID_MARK, _TEXT_MARK, _SHA256_MARK = (f"{_MARK}-{part}"
                                                       for part in ("timestamp", "id", "text", "sha256"))

MESSAGE_FRAGMENTS_MAX = 4096           # contexts whose line fragments an AlertLog keeps (emptied when full)

# (with text: before @timestamp, before event.id, before the text's JSON string, before its sha256, the rest;
#  without text: before @timestamp, before event.id, the rest)
MessageFragments = tuple[tuple[bytes, bytes, bytes, bytes, bytes], tuple[bytes, bytes, bytes]]

_CONTEXT_STRING_FIELDS = tuple(f.name for f in dataclasses.fields(ChatContext) if f.name != "recipients")


def is_plain_message(decision: Decision) -> bool:
    """An allowed message that matched no rule, not even in shadow, with no rewritten text and no notice:
    the bulk of the events, and the only kind AlertLog.write_message renders from cached fragments."""
    return (type(decision) is Decision and decision.action == ALLOW and not decision.matches
            and not decision.shadow and decision.masked_text is None and not decision.notice
            and type(decision.policy_version) is str)


def is_plain_message_event(event: dict[str, Any]) -> bool:
    """The event of a plain message (message_event for a decision is_plain_message finds plain): a message
    allowed with no rule named (a shadow match names its rules) and no text rewritten."""
    fields = event.get("event") or {}
    return (fields.get("dataset") == "imguard.message" and fields.get("kind") == "event"
            and fields.get("action") == ALLOW and "id" not in event.get("rule", {})
            and (event.get("imguard") or {}).get("decision", {}).get("masked_text") is None
            and not (event.get("imguard") or {}).get("decision", {}).get("notice"))


def _cacheable_context(ctx: ChatContext) -> bool:
    # Fragments are cached by the context's identity: sound only when its fields cannot change under it
    # (frozen, and plain strings, not a list of recipients someone may append to or objects rendered by str()).
    return (type(ctx) is ChatContext and type(ctx.recipients) is tuple
            and all(type(recipient) is str for recipient in ctx.recipients)
            and all(type(getattr(ctx, name)) is str for name in _CONTEXT_STRING_FIELDS))


def _split_at_marks(line: bytes, marks: tuple[bytes, ...]) -> tuple[bytes, ...] | None:
    """`line` cut at each mark (each found exactly once, in this order), the marks left out; None otherwise."""
    parts = []
    rest = line
    for mark in marks:
        if line.count(mark) != 1:
            return None
        before, found, rest = rest.partition(mark)
        if not found:
            return None
        parts.append(before)
    parts.append(rest)
    return tuple(parts)


def _template_line(event: dict[str, Any], instance: str) -> bytes | None:
    # What AlertLog.write would write for this event: observer.name, then encode(). Only the orjson rendering
    # is templated; a context that needs encode()'s json fallback (a lone surrogate) takes the general path.
    event["@timestamp"] = _TIMESTAMP_MARK
    event["event"]["id"] = _ID_MARK
    event["observer"]["name"] = instance
    try:
        line = orjson.dumps(event, default=str, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        return None
    return _escape_raw_line_breaks(line)


def plain_message_fragments(ctx: ChatContext, decision: Decision, instance: str) -> MessageFragments | None:
    """The fragments of a plain message's line for this context, decision and observer name, cut from the
    line the general path writes. None when that line cannot be templated (the general path must write it)."""
    if not _cacheable_context(ctx) or not is_plain_message(decision):
        return None
    with_text = message_event(_TEXT_MARK, ctx, decision)
    with_text["imguard"]["message"]["sha256"] = _SHA256_MARK
    without_text = message_event(None, ctx, decision)
    lines = _template_line(with_text, instance), _template_line(without_text, instance)
    if lines[0] is None or lines[1] is None:
        return None
    timestamp, event_id, sha256 = _TIMESTAMP_MARK.encode(), _ID_MARK.encode(), _SHA256_MARK.encode()
    text_json = orjson.dumps(_TEXT_MARK)           # the text goes in as a JSON string, its quotes included
    text_parts = _split_at_marks(lines[0], (timestamp, event_id, text_json, sha256))
    bare_parts = _split_at_marks(lines[1], (timestamp, event_id))
    if text_parts is None or bare_parts is None:
        return None
    return text_parts, bare_parts            # type: ignore[return-value]   (5 and 3 parts: one per mark, plus one)


def plain_message_line(fragments: MessageFragments, text: str | None) -> bytes | None:
    """The line of a plain message from its context's fragments: what encode(message_event(...)) gives, given
    the same @timestamp and event.id. None for a text orjson refuses (encode would fall back to json), and under a
    capture clock (the template has no event.created)."""
    if _capture_clock.get() is not None:
        return None
    if text is None:
        event_id = new_event_id().encode()
        head, after_timestamp, rest = fragments[1]
        return b"".join((head, _now().encode(), after_timestamp, event_id, rest))
    if type(text) is not str:
        return None
    try:
        text_json = orjson.dumps(text)
    except orjson.JSONEncodeError:                 # a lone surrogate
        return None
    # The sha256 of the UTF-8 text: orjson took it, so it has no surrogate for "replace" to replace.
    digest = hashlib.sha256(text.encode()).hexdigest().encode()
    event_id = new_event_id().encode()           # before the timestamp, as _base takes them
    head, after_timestamp, after_id, after_text, rest = fragments[0]
    return b"".join((head, _now().encode(), after_timestamp, event_id, after_id,
                     _escape_raw_line_breaks(text_json), after_text, digest, rest))


class AlertLog:
    """Appends events as JSON lines to one file. Safe to call from several threads.

    With `max_bytes`, the file is rotated by size: alerts.jsonl -> alerts.jsonl.1 -> ... -> .`backups`,
    the oldest deleted. A line is never split across files. Another process that appends to the same
    file notices the rotation (the path names a new inode) and reopens.
    """

    def __init__(self, path: Path, instance: str = "", max_bytes: int = 0, backups: int = 5,
                 plain_flush_seconds: float = 0.0, allowed_messages: bool = True):
        self.path = Path(path)
        # Without allowed_messages (setting jsonl_allowed_messages), a plain message (is_plain_message: allowed,
        # no rule matched, not even in shadow) gets no line: the archive keeps its record, the metrics count it.
        self.allowed_messages = allowed_messages
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.instance = instance or socket.gethostname()
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._fd = -1
        self._open()
        # With plain_flush_seconds, plain events (an allowed chat message: one per message, the bulk of
        # the log) are gathered and written together at most that late, or with the next alert, which is
        # always written (and fsync'ed) at once. The gateway uses 0.2 s: one write per burst instead of
        # one per message. The archive holds those messages durably meanwhile.
        self.plain_flush_seconds = plain_flush_seconds
        self._pending = bytearray()
        self._flusher: threading.Thread | None = None
        self._closing = threading.Event()
        # id(context) -> (context, observer name, policy version, its plain_message_fragments or None): see
        # write_message. The context itself is kept so that its id cannot be reused while it is here.
        self._message_fragments: dict[int, tuple[ChatContext, str, str, MessageFragments | None]] = {}
        if plain_flush_seconds > 0:
            self._flusher = threading.Thread(target=self._flush_loop, name="imguard-alertlog", daemon=True)
            self._flusher.start()

    def _flush_loop(self) -> None:
        while not self._closing.wait(self.plain_flush_seconds):
            self.flush()

    def flush(self) -> None:
        """Write the gathered plain events now."""
        with self._lock:
            self._write_pending(b"")

    def _write_pending(self, line: bytes) -> None:
        data = bytes(self._pending) + line if self._pending else line
        self._pending.clear()
        if not data or self._fd < 0:
            return
        if self.max_bytes:
            self._rotate_if_needed(len(data))
        os.write(self._fd, data)
        self._size += len(data)

    def _open(self) -> None:
        # O_APPEND: every line lands whole at the end, even with several gateway processes. 0600: the events hold
        # chat text and names (the umask can only take bits away; a log shipper reads it as root or this user).
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        stat = os.fstat(self._fd)
        self._ino, self._size, self._checked_at = stat.st_ino, stat.st_size, time.monotonic()

    def _rotate_if_needed(self, incoming: int) -> None:
        # The size is tracked from our own writes; the path is looked at again once a second, since
        # another process may have appended or rotated (two system calls per line would cost more than
        # the write itself).
        if time.monotonic() - self._checked_at >= 1.0:
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current != self._ino:            # rotated (or removed) by someone else: follow the path
                os.close(self._fd)
                self._open()
            self._size, self._checked_at = os.fstat(self._fd).st_size, time.monotonic()
        if self._size == 0 or self._size + incoming <= self.max_bytes:
            return
        self._size = os.fstat(self._fd).st_size          # the true size decides
        if self._size == 0 or self._size + incoming <= self.max_bytes:
            return
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        if self.backups > 0:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            os.unlink(self.path)
        os.close(self._fd)
        self._open()

    def write(self, event: dict[str, Any]) -> None:
        if not self.allowed_messages and is_plain_message_event(event):
            return
        observer = event.get("observer")
        if observer is None:
            observer = event["observer"] = OBSERVER.copy()
        observer["name"] = self.instance
        self._append(encode(event), alert=event.get("event", {}).get("kind") == "alert")

    def write_message(self, text: str | None, ctx: ChatContext, decision: Decision) -> None:
        """write(message_event(text, ctx, decision)), the same bytes. A plain message (is_plain_message) is
        rendered from fragments cached for its context object, without building the event: a session reuses
        one context per peer, so a conversation's messages share them."""
        if is_plain_message(decision):
            self.write_plain_message(text, ctx, decision)
        else:
            self.write(message_event(text, ctx, decision))

    def write_plain_message(self, text: str | None, ctx: ChatContext, decision: Decision) -> None:
        """write_message for a decision the caller found plain (is_plain_message)."""
        if not self.allowed_messages:
            return
        fragments = self._fragments_for(ctx, decision)
        line = plain_message_line(fragments, text) if fragments is not None else None
        if line is None:                # a context or text only the general path renders
            self.write(message_event(text, ctx, decision))
        else:
            self._append(line, alert=False)

    def _fragments_for(self, ctx: ChatContext, decision: Decision) -> MessageFragments | None:
        # Read and written without the lock: a dict lookup or store is atomic, and two threads building the
        # same fragments at once both build correct ones.
        version, instance = decision.policy_version, self.instance
        entry = self._message_fragments.get(id(ctx))
        if entry is None or entry[0] is not ctx or entry[1] != instance or entry[2] != version:
            entry = (ctx, instance, version, plain_message_fragments(ctx, decision, instance))
            if len(self._message_fragments) >= MESSAGE_FRAGMENTS_MAX:
                self._message_fragments.clear()
            self._message_fragments[id(ctx)] = entry
        return entry[3]

    def _append(self, line: bytes, alert: bool) -> None:
        """One encoded line: written (and fsync'ed) at once when an alert, else gathered when batching."""
        with self._lock:
            if alert or not self.plain_flush_seconds:
                self._write_pending(line)
                if alert:
                    os.fsync(self._fd)
            else:
                self._pending += line
                if len(self._pending) >= 64 * 1024:
                    self._write_pending(b"")

    def close(self) -> None:
        self._closing.set()
        if self._flusher is not None:
            self._flusher.join(5)
        with self._lock:
            self._write_pending(b"")
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
