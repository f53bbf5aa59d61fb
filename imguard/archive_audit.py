"""What an auditor asks of the archive: proof that it is intact (verify), legal holds, and retention by group.

Verify. Every archive record carries its writer's chain (imguard/archive.py, CHAIN): `digest` = SHA-256 of the
record's canonical bytes, `chain` = SHA-256(previous chain || digest). verify() walks each chain in `chain_seq`
order, the links of records that retention removed (`removed_records`) included, and names the first record
whose content no longer matches its digest, whose link is broken, or whose place is empty (a deleted record).
Records written before the chain existed (an archive upgraded in place) are reported as unchained, not as
tampered; an unchained record stored after the first chained one was not written by imguard and is reported.
The quarantine keeps a chained ledger of its own (imguard/quarantine.py); verify checks it and every file it
says is kept. A hash chain proves nothing about its own tail: deleting a chain's last records leaves a shorter
valid chain. verify prints each chain's head; keep them (`--save-heads`) and give them to the next verify
(`--heads`), which then also proves that nothing before those heads was cut.

Holds. A hold (by person, group or conversation) keeps every record and quarantined file it covers, whatever
the retention rules say. Holds live in the archive's database (`holds`), so every gateway sharing a PostgreSQL
archive sees them.

Retention by group. Rules `GROUP:max=DAYS` (delete a member's records older than that) and `GROUP:min=DAYS`
(keep them at least that long: no max rule, nor the quarantine's age limit, removes them sooner); the groups are
the policy's (rules/groups.yaml, imguard/policy/zones.py PartyPattern), plus `*` for everyone. A record belongs
to a group when its sender or a recipient does. The strictest keeping wins: a record is deleted only when some
max rule says so, no min rule of any of its parties still keeps it, and no hold covers it.
"""

from __future__ import annotations

import dataclasses
import datetime
import getpass
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from imguard import alerts, archive as archive_module
from imguard.model import ChatContext
from imguard.policy.zones import PartyPattern, Zones

log = logging.getLogger(__name__)

SCOPES = ("person", "group", "conversation")


# --- events ---------------------------------------------------------------------------------------------

def archive_event(action: str, message: str, types: list[str], category: str = "configuration",
                  outcome: str = "success", operator: str = "", **fields: Any) -> dict[str, Any]:
    """An event of the `imguard.archive` dataset: verify, hold add/release, retention, export."""
    failed = outcome == "failure"
    event = alerts._base("alert" if failed else "event", "archive", ChatContext(), [category], types,
                         action=action, outcome=outcome)
    event["message"] = message
    if failed:
        event["imguard"]["severity"] = "high"
        event["event"]["severity"] = alerts.SEVERITY_NUMBER["high"]
    if operator:
        event["user"] = {"name": operator}
        event["related"] = {"user": [operator]}
    event["imguard"]["archive"] = fields
    return event


def operator_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


# --- verify ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Verification:
    chains: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)   # id -> records, seq, head
    problems: list[str] = dataclasses.field(default_factory=list)
    unchained: int = 0
    unchained_before: str = ""          # the time of the first chained record
    removed: int = 0                    # links of records retention removed
    files: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


_NULLS = ", ".join(["NULL"] * len(archive_module.ROW_COLUMNS))
# Every chain in order: stored records and the links of removed ones (their content NULL).
_SELECT_CHAINED = (f"SELECT chain_id, chain_seq, 0, id, {', '.join(archive_module.ROW_COLUMNS)}, digest, chain "
                   "FROM records WHERE chain_id IS NOT NULL "
                   f"UNION ALL SELECT chain_id, chain_seq, 1, NULL, {_NULLS}, digest, chain FROM removed_records "
                   "ORDER BY 1, 2")


def verify(store: archive_module.Archive, quarantine: Any = None,
           heads: dict[str, list] | None = None) -> Verification:
    """Check every chain of the archive (and the quarantine's ledger and files, when given). `heads`: chain id
    -> [seq, chain] from an earlier verify, each of which must still be in its chain."""
    db = store.database()
    result = Verification()
    width = len(archive_module.ROW_COLUMNS)
    current = None
    expected, previous, broken = 1, archive_module.GENESIS, False
    for row in db.rows(_SELECT_CHAINED):
        chain_id, seq, removed, record_id = row[0], row[1], row[2], row[3]
        values, digest, chain = list(row[4:4 + width]), row[4 + width], row[5 + width]
        if chain_id != current:
            current, expected, previous, broken = chain_id, 1, archive_module.GENESIS, False
            result.chains[chain_id] = {"records": 0, "seq": 0, "head": archive_module.GENESIS, "first": values[1]}
        info = result.chains[chain_id]
        info["records"] += 0 if removed else 1
        result.removed += removed
        if broken:
            continue
        problem = ""
        if seq != expected:
            problem = "missing"
        elif not removed and archive_module.record_digest(chain_id, seq, values) != digest:
            problem = "altered (its content does not match its digest)"
        elif not digest or not chain or archive_module.link(previous, digest) != chain:
            problem = "chain link broken (this record's digest or chain, or the one before, was altered)"
        elif heads and chain_id in heads and heads[chain_id][0] == seq and heads[chain_id][1] != chain:
            problem = "differs from the head saved earlier"
        if problem:
            where = f"chain {chain_id} seq {seq}" + ("" if removed else f" (record id {record_id}, {values[1]})")
            result.problems.append(f"chain {chain_id}: records seq {expected}..{seq - 1} are missing (deleted), "
                                   f"before {where}" if problem == "missing" else f"{where}: {problem}")
            broken = True
            continue
        expected, previous = seq + 1, chain
        info["seq"], info["head"] = seq, chain
    for chain_id, (seq, _head) in (heads or {}).items():
        info = result.chains.get(chain_id)
        if info is None:
            result.problems.append(f"chain {chain_id}: saved earlier at seq {seq}, now absent (deleted)")
        elif not any(p.startswith(f"chain {chain_id}") for p in result.problems) and info["seq"] < seq:
            result.problems.append(f"chain {chain_id}: ends at seq {info['seq']}, but was saved earlier at seq {seq} "
                                   "(its last records were deleted)")
    first = db.fetch("SELECT MIN(id), MIN(time) FROM records WHERE chain_id IS NOT NULL")[0]
    result.unchained = db.fetch("SELECT COUNT(*) FROM records WHERE chain_id IS NULL")[0][0]
    result.unchained_before = first[1] or ""
    if first[0] is not None:
        for record_id, time in db.fetch("SELECT id, time FROM records WHERE chain_id IS NULL AND id > "
                                        f"{db.mark} ORDER BY id LIMIT 10", [first[0]]):
            result.problems.append(f"record id {record_id} ({time}): stored outside the chain after the chain "
                                   "began (not written by imguard)")
    if quarantine is not None:
        problems, result.files = quarantine.verify()
        result.problems += problems
    return result


def verification_report(result: Verification) -> str:
    lines = []
    for chain_id, info in sorted(result.chains.items()):
        lines.append(f"chain {chain_id}: {info['records']} records, head seq {info['seq']} {info['head']}")
    if result.removed:
        lines.append(f"{result.removed} records removed by retention (their links kept)")
    if result.unchained:
        lines.append(f"{result.unchained} records unchained before {result.unchained_before or 'now'} "
                     "(archived before the chain existed; not verifiable)")
    if result.files:
        lines.append("quarantine: " + ", ".join(f"{n} {what}" for what, n in sorted(result.files.items())))
    lines += [f"TAMPERED: {p}" for p in result.problems]
    lines.append("archive verified: every chain is unbroken" if result.ok else
                 f"archive verification FAILED: {len(result.problems)} problems")
    return "\n".join(lines)


# --- holds ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Hold:
    id: str
    scope: str              # person, group or conversation
    value: str
    reason: str = ""
    created_at: str = ""
    created_by: str = ""
    released_at: str | None = None
    released_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_HOLD_COLUMNS = ("id", "scope", "value", "reason", "created_at", "created_by", "released_at", "released_by")


def add_hold(store: archive_module.Archive, scope: str, value: str, reason: str = "", operator: str = "") -> Hold:
    if scope not in SCOPES:
        raise ValueError(f"a hold's scope is one of {', '.join(SCOPES)}, not {scope!r}")
    if not value.strip():
        raise ValueError("a hold needs a value (the person, group or conversation)")
    hold = Hold("hold-" + os.urandom(6).hex(), scope, value.strip(), reason, _now(), operator)
    db = store.database()
    m = ", ".join([db.mark] * 6)
    db.execute(f"INSERT INTO holds (id, scope, value, reason, created_at, created_by) VALUES ({m})",
               [hold.id, hold.scope, hold.value, hold.reason, hold.created_at, hold.created_by])
    return hold


def release_hold(store: archive_module.Archive, hold_id: str, operator: str = "") -> Hold | None:
    """Release a hold in force; None when there is none with that id."""
    if not any(h.id == hold_id for h in list_holds(store)):
        return None
    db = store.database()
    m = db.mark
    db.execute(f"UPDATE holds SET released_at = {m}, released_by = {m} WHERE id = {m} AND released_at IS NULL",
               [_now(), operator, hold_id])
    return next(h for h in list_holds(store, released=True) if h.id == hold_id)


def list_holds(store: archive_module.Archive, released: bool = False) -> list[Hold]:
    sql = f"SELECT {', '.join(_HOLD_COLUMNS)} FROM holds"
    if not released:
        sql += " WHERE released_at IS NULL"
    return [Hold(*row) for row in store.database().fetch(sql + " ORDER BY created_at, id")]


def hold_event(action: str, hold: Hold, operator: str) -> dict[str, Any]:
    verb = {"archive_hold_add": "placed", "archive_hold_release": "released"}[action]
    return archive_event(action, f"legal hold {hold.id} on {hold.scope} {hold.value} {verb}",
                         ["creation" if action == "archive_hold_add" else "deletion"], operator=operator,
                         hold=hold.to_dict())


class Parties:
    """Who belongs to which group: the policy's groups and zones (rules/groups.yaml)."""

    def __init__(self, groups: dict[str, list[PartyPattern]] | None = None, zones: Zones | None = None):
        self.groups = groups or {}
        self.zones = zones or Zones()

    def in_group(self, identity: str, group: str) -> bool:
        if group == "*":
            return True
        return any(p.matches(identity, self.zones) for p in self.groups.get(group, ()))

    @classmethod
    def from_rules(cls, rules_dirs: Iterable[Path]) -> "Parties":
        from imguard.policy.loading import load_policy
        policy = load_policy(list(rules_dirs))
        return cls(policy.groups, policy.zones)


def _parties(sender: str | None, recipients: str | None) -> list[str]:
    return [p for p in [sender or "", *(recipients or "").split()] if p]


def _same_person(identity: str, person: str) -> bool:
    return PartyPattern.parse(person).matches(identity, Zones()) or person.lower() in identity.lower()


def held(holds: list[Hold], parties: Parties, sender: str | None, recipients: str | None,
         conversation: str | None) -> Hold | None:
    """The first hold that covers a record with these parties and conversation."""
    people = _parties(sender, recipients)
    for hold in holds:
        if hold.scope == "conversation":
            if hold.value.lower() in ((conversation or "").lower(), *(p.lower() for p in people)):
                return hold
        elif hold.scope == "person":
            if any(_same_person(p, hold.value) for p in people):
                return hold
        elif any(parties.in_group(p, hold.value) for p in people):
            return hold
    return None


# --- retention ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RetentionRule:
    group: str
    bound: str              # "max" (delete after) or "min" (keep at least)
    days: float

    @classmethod
    def parse(cls, text: str) -> "RetentionRule":
        group, _, rest = text.strip().rpartition(":")
        bound, _, days = rest.partition("=")
        try:
            value = float(days)
        except ValueError:
            value = -1
        if not group or bound not in ("max", "min") or value < 0:
            raise ValueError(f"archive_retention: {text!r} is not GROUP:max=DAYS or GROUP:min=DAYS")
        return cls(group, bound, value)


@dataclasses.dataclass
class RetentionResult:
    deleted: int = 0                # records deleted (their links kept in removed_records)
    held: int = 0                   # records a max rule would have deleted, kept by a hold
    kept_by_min: int = 0            # ... kept by a min rule
    files_deleted: int = 0          # quarantined files removed
    files_held: int = 0             # quarantined files kept by a hold or a min rule

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _older(time_text: str, now: float, days: float) -> bool:
    try:
        stamp = datetime.datetime.fromisoformat(time_text).timestamp()
    except (TypeError, ValueError):
        return False            # a time we cannot read is kept: deleting is what needs a reason
    return now - stamp > days * 86400


def retention_verdict(rules: list[RetentionRule], holds: list[Hold], parties: Parties, now: float,
                      time_text: str, sender: str | None, recipients: str | None,
                      conversation: str | None) -> str:
    """'delete', 'keep', 'held' (a hold keeps it) or 'min' (a min rule keeps it)."""
    people = _parties(sender, recipients) or [""]
    due = any(rule.bound == "max" and any(parties.in_group(p, rule.group) for p in people)
              and _older(time_text, now, rule.days) for rule in rules)
    if not due:
        return "keep"
    if any(rule.bound == "min" and any(parties.in_group(p, rule.group) for p in people)
           and not _older(time_text, now, rule.days) for rule in rules):
        return "min"
    if held(holds, parties, sender, recipients, conversation):
        return "held"
    return "delete"


def apply_retention(store: archive_module.Archive, rules: list[RetentionRule], parties: Parties,
                    now: float, quarantine: Any = None) -> RetentionResult:
    """Delete the records the rules let go (not held, not kept by a min rule); their chain links move to
    removed_records, so verify still proves the chain. With `quarantine`, its files get the same treatment
    (a file is kept while a hold or a min rule covers any sighting of it)."""
    result = RetentionResult()
    holds = list_holds(store)
    db = store.database()
    m = db.mark
    max_days = [rule.days for rule in rules if rule.bound == "max"]
    if max_days:
        # Only records older than the shortest max can be due (times are ISO 8601 UTC: text order is time order).
        cutoff = datetime.datetime.fromtimestamp(now - min(max_days) * 86400, datetime.timezone.utc).isoformat()
        doomed = []
        for record_id, time_text, sender, recipients, conversation in db.fetch(
                f"SELECT id, time, sender, recipients, conversation FROM records WHERE time < {m} ORDER BY id",
                [cutoff]):
            verdict = retention_verdict(rules, holds, parties, now, time_text, sender, recipients, conversation)
            if verdict == "delete":
                doomed.append(record_id)
            elif verdict == "held":
                result.held += 1
            elif verdict == "min":
                result.kept_by_min += 1
        removed_at = _now()
        for start in range(0, len(doomed), 500):
            ids = doomed[start:start + 500]
            marks = ", ".join([m] * len(ids))
            db.transaction([
                (f"INSERT INTO removed_records (chain_id, chain_seq, digest, chain, time, removed_at, reason) "
                 f"SELECT chain_id, chain_seq, digest, chain, time, {m}, {m} FROM records "
                 f"WHERE id IN ({marks}) AND chain_id IS NOT NULL", [removed_at, "retention", *ids]),
                (f"DELETE FROM records WHERE id IN ({marks})", ids)])
        result.deleted = len(doomed)
    if quarantine is not None:
        def keep(sidecar: dict[str, Any]) -> bool:
            """A file is kept past the quarantine's limits while a hold or a min rule covers one of its sightings."""
            for sighting in sidecar.get("sightings", ()):
                context = sighting.get("context", {})
                sender, recipients = context.get("sender"), " ".join(context.get("recipients") or ())
                if held(holds, parties, sender, recipients, context.get("conversation")):
                    return True
                people = _parties(sender, recipients)
                if any(rule.bound == "min" and any(parties.in_group(p, rule.group) for p in people)
                       and not _older(sighting.get("time", ""), now, rule.days) for rule in rules):
                    return True
            return False
        removed = quarantine.apply_retention(now=now, keep=keep)
        result.files_deleted, result.files_held = len(removed), quarantine.last_kept
    return result


def retention_event(result: RetentionResult, rules: list[RetentionRule], operator: str = "") -> dict[str, Any]:
    return archive_event("archive_retention", f"archive retention: {result.deleted} records and "
                         f"{result.files_deleted} quarantined files deleted, {result.held} records held",
                         ["change"], category="database", operator=operator,
                         retention=result.to_dict(), rules=[f"{r.group}:{r.bound}={r.days:g}" for r in rules])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_heads(path: Path) -> dict[str, list]:
    return json.loads(Path(path).read_text())


def save_heads(path: Path, result: Verification) -> None:
    Path(path).write_text(json.dumps({cid: [i["seq"], i["head"]] for cid, i in result.chains.items()}, indent=1))


def housekeeping(pipeline: Any, now: float | None = None) -> RetentionResult | None:
    """The gateway's hourly retention (imguard/gateway/cli.py): the archive's `archive_retention` rules and the
    quarantine's limits, both sparing held records and files; an `archive_retention` event when anything was
    deleted or kept by a hold. Groups and zones are those of the policy in force."""
    import time as time_module
    store = getattr(pipeline, "archive", None)
    quarantine = getattr(pipeline, "quarantine", None)
    if store is None:
        if quarantine is not None:
            quarantine.apply_retention(now=now)
        return None
    rules = [RetentionRule.parse(text) for text in getattr(store.settings, "archive_retention", ())]
    policy = pipeline._in_force[0] if hasattr(pipeline, "_in_force") else None
    parties = Parties(getattr(policy, "groups", None), getattr(policy, "zones", None))
    try:
        result = apply_retention(store, rules, parties, time_module.time() if now is None else now, quarantine)
    except Exception as e:  # noqa: BLE001 - the database is down or busy: the next round tries again
        log.warning("archive retention failed: %s: %s", type(e).__name__, e)
        return None
    if result.deleted or result.files_deleted or result.held or result.files_held:
        pipeline.record(retention_event(result, rules))
    return result
