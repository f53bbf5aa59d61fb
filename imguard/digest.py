"""The daily digest: one mail to the security team about the last day, read from the alert log.

    imguard digest --since 24h --to soc@example.com --smtp mail.example.com:25

What it counts (`summarize`) comes from `DATA_DIR/alerts.jsonl` and its rotations, the one record every
gateway of a data folder writes: decisions (blocks, quarantines, masks, alerts, by protocol), the rules that
matched most, the senders whose messages and files were blocked most, every sink's trouble (imguard.sink
events) and every gateway's health (observer.name: when it last wrote, its anomalies, TLS interception
failures, refused policy reloads; a gateway that wrote before the period and not in it is named silent). An
event that stands for suppressed duplicates (imguard.suppressed_count) counts for all of them. The mail has the
summary as text and the same numbers as a JSON attachment (`digest.json`) for a script. A systemd timer runs it
daily (deploy/systemd/imguard-digest.timer) with its settings in a configuration file (`--config`, keys as the
options).
"""

from __future__ import annotations

import datetime
import json
import re
import smtplib
import socket
import ssl
from collections import Counter
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, Iterable, Iterator

from imguard.settings import setting

DECISION_DATASETS = ("imguard.message", "imguard.file")
BLOCKING = ("block", "quarantine")
_ROTATION = re.compile(r"^alerts\.jsonl(?:\.(\d+))?$")


@dataclass(frozen=True)
class DigestSettings:
    """Daily digest"""
    since: str = setting("24h", "How far back the digest looks: an age (24h, 7d, 30m) or an ISO date/time (UTC).")
    to: list = setting([], "Recipients of the digest (repeat the option for several); none: print it instead.")
    smtp: str = setting("", "SMTP server host:port the digest is sent through.")
    mail_from: str = setting("imguard@localhost", "Sender address of the digest.")
    top: int = setting(10, "How many rules and senders the top lists name.")
    starttls: bool = setting(False, "Use STARTTLS with the SMTP server (its certificate must verify against the "
                                    "system's CAs and name the host), or the digest goes in clear text.")


def _time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def alert_files(data_dir: Path) -> list[Path]:
    """alerts.jsonl and its rotations (alerts.jsonl.1 is older than alerts.jsonl), oldest first."""
    found = []
    for path in Path(data_dir).glob("alerts.jsonl*"):
        m = _ROTATION.match(path.name)
        if m and path.is_file():
            found.append((-int(m[1] or 0), path))
    return [path for _, path in sorted(found)]


def read_events(paths: Iterable[Path]) -> Iterator[dict]:
    """Every event of the files; a line that is not a JSON object is skipped (a line being written)."""
    for path in paths:
        with open(path, "rb") as f:
            for line in f:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    yield event


def _list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


@dataclass
class GatewayHealth:
    name: str
    events: int = 0
    last_seen: str = ""
    anomalies: int = 0
    tls_failures: int = 0
    reloads_refused: int = 0
    reloads: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarize(events: Iterable[dict], since: datetime.datetime, until: datetime.datetime,
              top: int = 10) -> dict[str, Any]:
    """The digest's numbers over the events written in [since, until)."""
    actions: Counter = Counter()
    blocked_by_protocol: Counter = Counter()
    rules: Counter = Counter()
    senders: Counter = Counter()
    sinks: dict[str, Counter] = {}
    gateways: dict[str, GatewayHealth] = {}
    total = 0
    last_before: dict[str, str] = {}       # gateways' last event before the period: one silent since is news
    for event in events:
        when = _time(event.get("@timestamp"))
        if when is not None and when < since:
            name = (event.get("observer") or {}).get("name") or "(unnamed)"
            last_before[name] = max(last_before.get(name, ""), event.get("@timestamp", ""))
        if when is None or not since <= when < until:
            continue
        imguard = event.get("imguard") or {}
        weight = 1 + int(imguard.get("suppressed_count") or 0)
        total += weight
        ev = event.get("event") or {}
        action, dataset = ev.get("action", ""), ev.get("dataset", "")
        name = (event.get("observer") or {}).get("name") or "(unnamed)"
        health = gateways.get(name) or gateways.setdefault(name, GatewayHealth(name))
        health.events += weight
        stamp = event.get("@timestamp", "")
        health.last_seen = max(health.last_seen, stamp)
        if dataset == "imguard.anomaly":
            health.anomalies += weight
        elif dataset == "imguard.tls":
            health.tls_failures += weight
        elif dataset == "imguard.policy":
            health.reloads += 1
            if ev.get("outcome") == "failure":
                health.reloads_refused += 1
        elif dataset == "imguard.sink":
            sink = imguard.get("sink") or {}
            sinks.setdefault(sink.get("name") or "?", Counter())[sink.get("kind") or action] += weight
        if dataset not in DECISION_DATASETS or ev.get("kind") != "alert":
            continue
        actions[action] += weight
        decision = imguard.get("decision") or {}
        for match in decision.get("matches") or ():
            rules[match.get("rule_id", "?")] += weight
        if action in BLOCKING:
            blocked_by_protocol[(event.get("network") or {}).get("protocol") or "?"] += weight
            sender = (event.get("user") or {}).get("name") or (imguard.get("context") or {}).get("sender") or "?"
            senders[sender] += weight

    def ranked(counter: Counter) -> list[list]:
        return [[key, count] for key, count in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]

    return {
        "since": since.isoformat(timespec="seconds"), "until": until.isoformat(timespec="seconds"),
        "events": total,
        "decisions": {a: actions[a] for a in ("block", "quarantine", "mask", "alert") if actions[a]},
        "blocked": actions["block"] + actions["quarantine"],
        "blocked_by_protocol": dict(sorted(blocked_by_protocol.items())),
        "top_rules": ranked(rules),
        "top_blocked_senders": ranked(senders),
        "sinks": {name: dict(sorted(kinds.items())) for name, kinds in sorted(sinks.items())},
        "gateways": [g.to_dict() for g in sorted(gateways.values(), key=lambda g: g.name)],
        "silent_gateways": {name: last for name, last in sorted(last_before.items()) if name not in gateways},
    }


def render_text(summary: dict[str, Any]) -> str:
    """The digest as a person reads it."""
    lines = [f"imguard digest, {summary['since']} to {summary['until']}", "",
             f"Events: {summary['events']}",
             f"Blocked (block + quarantine): {summary['blocked']}"]
    for action, count in summary["decisions"].items():
        lines.append(f"  {action}: {count}")
    if summary["blocked_by_protocol"]:
        lines.append("Blocked by protocol: " + ", ".join(f"{p} {n}" for p, n in summary["blocked_by_protocol"].items()))
    lines += ["", "Top rules:"]
    lines += [f"  {n:6d}  {rule}" for rule, n in summary["top_rules"]] or ["  (none)"]
    lines += ["", "Top senders of blocked content:"]
    lines += [f"  {n:6d}  {who}" for who, n in summary["top_blocked_senders"]] or ["  (none)"]
    lines += ["", "Sinks:"]
    if summary["sinks"]:
        lines += [f"  {name}: " + ", ".join(f"{kind} {n}" for kind, n in kinds.items())
                  for name, kinds in summary["sinks"].items()]
    else:
        lines.append("  no trouble reported")
    lines += ["", "Gateways:"]
    if summary["gateways"]:
        for g in summary["gateways"]:
            lines.append(f"  {g['name']}: {g['events']} events, last at {g['last_seen']}; {g['anomalies']} anomalies, "
                         f"{g['tls_failures']} TLS failures, {g['reloads_refused']} of {g['reloads']} reloads refused")
    else:
        lines.append("  none wrote an event in this period (is any running?)")
    for name, last in summary["silent_gateways"].items():
        lines.append(f"  {name}: SILENT, no event in this period (the last at {last})")
    return "\n".join(lines) + "\n"


def build_mail(summary: dict[str, Any], sender: str, recipients: list[str]) -> EmailMessage:
    mail = EmailMessage()
    mail["Subject"] = (f"imguard digest: {summary['blocked']} blocked, {summary['events']} events "
                       f"since {summary['since']}")
    mail["From"] = sender
    mail["To"] = ", ".join(recipients)
    mail["Date"] = formatdate(localtime=False, usegmt=True)
    mail["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    mail.set_content(render_text(summary))
    mail.add_attachment(json.dumps(summary, indent=1, sort_keys=True).encode(), maintype="application",
                        subtype="json", filename="digest.json")
    return mail


def send(mail: EmailMessage, smtp: str, starttls: bool = False, timeout: float = 30.0) -> None:
    """Deliver through `smtp` (host:port); raises OSError or smtplib.SMTPException when it fails."""
    from imguard.sinks.mail import _host_port       # the alert mails' reading of host:port
    host, port = _host_port(smtp)
    with smtplib.SMTP(host, port, timeout=timeout, local_hostname=socket.getfqdn()) as client:
        if starttls:
            client.starttls(context=ssl.create_default_context())
        client.send_message(mail)


def digest(data_dir: Path, settings: DigestSettings, now: datetime.datetime | None = None) -> tuple[dict, EmailMessage]:
    """The summary of data_dir's alert log since settings.since, and its mail."""
    from imguard.retrohunt import since_time
    until = now or datetime.datetime.now(datetime.timezone.utc)
    since = datetime.datetime.fromisoformat(since_time(settings.since))
    summary = summarize(read_events(alert_files(data_dir)), since, until, settings.top)
    return summary, build_mail(summary, settings.mail_from, list(settings.to))


def digest_main(args) -> int:
    """`imguard digest`: mail the digest (or print it without --to). Exit 0 sent or printed, 1 the SMTP server
    refused or could not be reached, 2 a usage error."""
    import sys

    from imguard import settings as S
    from imguard.cli import EXIT_BLOCKED, EXIT_OK, EXIT_USAGE, default_data_dir
    values = S.from_arguments(DigestSettings, args)
    data_dir = args.data_dir or default_data_dir()
    try:
        summary, mail = digest(data_dir, values)
    except ValueError as e:
        print(f"imguard digest: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    if not values.to:
        if not args.json:
            sys.stdout.write(render_text(summary))
        return EXIT_OK
    if not values.smtp:
        print("imguard digest: --to needs --smtp HOST:PORT", file=sys.stderr)
        return EXIT_USAGE
    try:
        send(mail, values.smtp, values.starttls)
    except (OSError, smtplib.SMTPException, ssl.SSLError) as e:
        print(f"imguard digest: could not send through {values.smtp}: {e}", file=sys.stderr)
        return EXIT_BLOCKED
    return EXIT_OK


def add_digest_arguments(parser) -> None:
    from imguard import settings as S
    from imguard.cli import default_data_dir
    parser.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                        help=f"the data folder whose alerts.jsonl is read (default: {default_data_dir()})")
    parser.add_argument("--json", action="store_true", help="also print the numbers as one JSON object")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="read these settings from a YAML file (keys: the options without their dashes); an "
                             "option given here wins over the file")
    S.add_arguments(parser, DigestSettings)
