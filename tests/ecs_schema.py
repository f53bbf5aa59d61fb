"""imguard's events checked against the Elastic Common Schema's own data, and against docs/events.md.

The schema is ECS's generated field list (tests/data/ecs/ecs_flat.yml; source and licence in its README: every
field's type, whether it is an array, and the allowed values of event.kind, event.category, event.type and
event.outcome, each category with the event types it expects). `EventChecker.check(event)` returns what is
wrong with one event:

- a field outside `imguard.*` that ECS does not define, or whose value has the wrong type (an `ip` that is a host
  name, a `long` that is a string, a `date` that does not parse);
- an array field (`event.category`, `event.type`, `related.*`) that is not a list;
- a value of event.kind/category/type/outcome or network.direction that ECS does not allow, and an event.type that
  none of the event's categories expects;
- `ecs.version` that is not the schema's; a field every event must have (`message`, `observer.version`, ...) missing;
  `user.name` and `related.*` that do not repeat the users, addresses and hashes the event names;
- a field (any, imguard's own included), dataset or action that docs/events.md does not document.

Used by tests/test_ecs.py and by the conftest hook that checks every event the test suite wrote.
"""

from __future__ import annotations

import collections
import datetime
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

ROOT = Path(__file__).resolve().parent.parent
ECS_DIR = Path(os.environ.get("IMGUARD_ECS_DIR", ROOT / "tests" / "data" / "ecs"))
EVENTS_DOC = ROOT / "docs" / "events.md"

# ECS lists network.direction's values in its description only.
NETWORK_DIRECTIONS = {"ingress", "egress", "inbound", "outbound", "internal", "external", "unknown"}
# Fields every imguard event carries.
REQUIRED = ("@timestamp", "ecs.version", "event.id", "event.kind", "event.category", "event.type", "event.module",
            "event.dataset", "observer.product", "observer.vendor", "observer.version", "observer.hostname",
            "message")
_STRING_TYPES = {"keyword", "constant_keyword", "wildcard", "match_only_text", "text"}
_CONTAINER_TYPES = {"object", "flattened", "nested"}


def schema_available() -> bool:
    return (ECS_DIR / "ecs_flat.yml").is_file()


class Schema:
    """ECS's fields (name -> definition) and the allowed values, from ecs_flat.yml."""

    def __init__(self, directory: Path = ECS_DIR):
        import csv

        import yaml
        with open(directory / "ecs_flat.yml", encoding="utf-8") as f:
            self.fields: dict[str, dict[str, Any]] = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        with open(directory / "fields.csv", encoding="utf-8", newline="") as f:
            self.version = next(csv.DictReader(f))["ECS_Version"]       # the same generation's version column
        self.allowed = {name: {v["name"] for v in self.fields[name].get("allowed_values", [])}
                        for name in ("event.kind", "event.category", "event.type", "event.outcome")}
        self.expected_types = {v["name"]: set(v.get("expected_event_types", []))
                               for v in self.fields["event.category"]["allowed_values"]}


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, leaf value) for every leaf; a list of dicts is walked into (its items share the path)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        for item in value:
            yield from flatten(item, prefix)
    else:
        yield prefix, value


def _type_ok(kind: str, value: Any) -> bool:
    if kind in _STRING_TYPES:
        return isinstance(value, str)
    if kind in ("long", "integer"):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in ("float", "double", "scaled_float", "half_float"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "ip":
        try:
            ipaddress.ip_address(value)
        except (ValueError, TypeError):
            return False
        return True
    if kind == "date":
        if not isinstance(value, str):
            return False
        try:
            datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return False
        return True
    return True            # geo_point and the like: imguard writes none


def _backticked(text: str) -> list[str]:
    return re.findall(r"`([^`\s]+)`", text)


class Docs:
    """What docs/events.md documents. Fields: the backticked names in the first cell of a table row (`file.hash.sha256`,
    `.sha1`: a sibling of the name before it; `imguard.report` or `imguard.anomaly.*`: everything under it). Words:
    every backticked word of the page (datasets, actions)."""

    def __init__(self, path: Path = EVENTS_DOC):
        text = path.read_text(encoding="utf-8")
        self.words: set[str] = set(_backticked(text))
        self.fields: set[str] = set()
        for line in text.splitlines():
            if not line.startswith("| `"):
                continue
            previous = ""
            for token in _backticked(line.split("|")[1]):
                if token.startswith(".") and previous:
                    token = previous.rsplit(".", 1)[0] + token
                token = token.removesuffix(".*")
                if re.fullmatch(r"@?[a-z_][a-z0-9_.]*", token):
                    self.fields.add(token)
                    previous = token

    def documents_field(self, path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:n]) in self.fields for n in range(len(parts), 0, -1))


class EventChecker:
    """Checks events; counts what it saw (`checked`, `families`: (dataset, action) -> count)."""

    def __init__(self, schema: Schema | None = None, docs: Docs | None = None):
        self.schema = schema or Schema()
        self.docs = docs or Docs()
        self.checked = 0
        self.families: collections.Counter[tuple[str, str]] = collections.Counter()
        self._leaf_cache: dict[tuple[str, type], str | None] = {}

    def _field_problem(self, path: str, value: Any) -> str | None:
        """What is wrong with one non-imguard leaf (None: nothing)."""
        fields = self.schema.fields
        # A leaf under an ECS object field (labels.*) is that field's business.
        parts = path.split(".")
        for n in range(len(parts) - 1, 0, -1):
            parent = fields.get(".".join(parts[:n]))
            if parent is not None and parent.get("type") in _CONTAINER_TYPES:
                return None
        definition = fields.get(path)
        if definition is None:
            return f"{path}: not an ECS field (imguard's own go under imguard.*)"
        kind = definition.get("type", "")
        is_array = "array" in (definition.get("normalize") or [])
        if isinstance(value, list):
            bad = [item for item in value if not _type_ok(kind, item)]
            if bad:
                return f"{path}: {bad[0]!r} is not of ECS type {kind}"
        elif is_array:
            return f"{path}: ECS wants an array, got {value!r}"
        elif value is not None and not _type_ok(kind, value):
            return f"{path}: {value!r} is not of ECS type {kind}"
        return None

    def check(self, event: dict[str, Any]) -> list[str]:
        problems: list[str] = []
        self.checked += 1
        ev = event.get("event", {}) if isinstance(event.get("event"), dict) else {}
        self.families[(str(ev.get("dataset", "")), str(ev.get("action", "")))] += 1
        leaves = dict(flatten(event))
        paths = set(leaves)
        for path, value in leaves.items():
            if not self.docs.documents_field(path):
                problems.append(f"{path}: not documented in docs/events.md")
            if path == "imguard" or path.startswith("imguard."):
                continue
            problem = self._field_problem(path, value)
            if problem:
                problems.append(problem)
        for name in REQUIRED:
            if name not in paths:
                problems.append(f"{name}: missing")
        allowed = self.schema.allowed
        if ev.get("kind") not in allowed["event.kind"]:
            problems.append(f"event.kind: {ev.get('kind')!r} is not an ECS value")
        categories = ev.get("category") if isinstance(ev.get("category"), list) else []
        types = ev.get("type") if isinstance(ev.get("type"), list) else []
        for category in categories:
            if category not in allowed["event.category"]:
                problems.append(f"event.category: {category!r} is not an ECS value")
        expected = set().union(*(self.schema.expected_types.get(c, set()) for c in categories)) if categories else set()
        for kind in types:
            if kind not in allowed["event.type"]:
                problems.append(f"event.type: {kind!r} is not an ECS value")
            elif kind not in expected:
                problems.append(f"event.type: {kind!r} is expected by none of the categories {categories}")
        if not types:
            problems.append("event.type: empty")
        if "outcome" in ev and ev["outcome"] not in allowed["event.outcome"]:
            problems.append(f"event.outcome: {ev['outcome']!r} is not an ECS value")
        direction = event.get("network", {}).get("direction")
        if direction is not None and direction not in NETWORK_DIRECTIONS:
            problems.append(f"network.direction: {direction!r} is not an ECS value")
        if event.get("ecs", {}).get("version") != self.schema.version:
            problems.append(f"ecs.version: {event.get('ecs', {}).get('version')!r}, "
                            f"the schema is {self.schema.version}")
        for word, what in ((ev.get("dataset"), "event.dataset"), (ev.get("action"), "event.action")):
            if word and word not in self.docs.words:
                problems.append(f"{what}: {word!r} not documented in docs/events.md")
        problems += self._related_problems(event)
        return problems

    @staticmethod
    def _related_problems(event: dict[str, Any]) -> list[str]:
        problems = []
        related = event.get("related", {})

        def names(value: Any) -> list[str]:
            return value if isinstance(value, list) else [value] if value else []
        sender = event.get("source", {}).get("user", {}).get("name")
        if sender and event.get("user", {}).get("name") != sender:
            problems.append("user.name: not the sender (source.user.name)")
        users = names(sender) + names(event.get("destination", {}).get("user", {}).get("name"))
        missing = [u for u in users if u not in related.get("user", [])]
        if missing:
            problems.append(f"related.user: misses {missing}")
        ips = [side["ip"] for side in (event.get("source", {}), event.get("destination", {})) if "ip" in side]
        if [ip for ip in ips if ip not in related.get("ip", [])]:
            problems.append("related.ip: misses an address of the event")
        hashes = [h for h in event.get("file", {}).get("hash", {}).values() if h]
        if [h for h in hashes if h not in related.get("hash", [])]:
            problems.append("related.hash: misses a hash of file.hash")
        return problems


def read_events(paths: Iterable[Path]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every event in the given alerts.jsonl files (lines that are not JSON objects are skipped)."""
    for path in paths:
        try:
            with open(path, "rb") as f:
                for line in f:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(event, dict):
                        yield path, event
        except OSError:
            continue


def alert_files(directory: Path) -> list[Path]:
    """The alerts.jsonl files (and their rotated .N) under `directory`."""
    return sorted(p for p in Path(directory).rglob("alerts.jsonl*") if p.is_file())


class SuiteEvents:
    """What the conftest hook gathers: the events the suite's gateways and pipelines wrote, checked as they are
    found (a folder is checked before the fixture that made it removes it)."""

    def __init__(self) -> None:
        self.checker: EventChecker | None = None
        self.files = 0
        self.problems: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}
        self._offsets: dict[tuple[int, int], int] = {}

    def collect(self, directory: Path) -> None:
        """Check the events written under `directory` since the last look (by file identity, so a file still
        growing or rotated meanwhile is read on from where it was left)."""
        if self.checker is None:
            self.checker = EventChecker()
        shapes: dict[str, list[str]] = {}
        for path in alert_files(directory):
            try:
                with open(path, "rb") as f:
                    stat = os.fstat(f.fileno())
                    identity = (stat.st_dev, stat.st_ino)
                    offset = self._offsets.get(identity, 0)
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            complete = data[:data.rfind(b"\n") + 1]           # a line being written is read next time
            if identity not in self._offsets:
                self.files += 1
            self._offsets[identity] = offset + len(complete)
            for line in complete.splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    self._check(path, event, shapes)

    def _check(self, path: Path, event: dict[str, Any], shapes: dict[str, list[str]]) -> None:
        # Events of one shape (same fields, same values but for the time, id, text and hash) share their problems:
        # a plain chat message is checked once per conversation, not once per line.
        key = _shape_key(event)
        problems = shapes.get(key) if key is not None else None
        if problems is None:
            problems = self.checker.check(event)
            if key is not None:
                shapes[key] = problems
        else:
            self.checker.checked += 1
            ev = event.get("event", {})
            self.checker.families[(str(ev.get("dataset", "")), str(ev.get("action", "")))] += 1
        for problem in problems:
            self.problems[problem] += 1
            self.examples.setdefault(problem, f"{path}: {json.dumps(event)[:400]}")

    def report(self) -> list[str]:
        checker = self.checker
        if checker is None:
            return ["no events found"]
        lines = [f"{checker.checked} events in {self.files} alerts.jsonl files, {len(checker.families)} "
                 f"(dataset, action) families: {len(self.problems)} distinct problems"]
        for problem, count in self.problems.most_common(40):
            lines.append(f"  {count:8d}  {problem}")
            lines.append(f"            e.g. {self.examples[problem]}")
        return lines


def _shape_key(event: dict[str, Any]) -> str | None:
    """A plain message's event with its varying values (time, id, text and its hash, the message) left out."""
    ev = event.get("event")
    if not isinstance(ev, dict) or ev.get("dataset") != "imguard.message" or ev.get("kind") != "event":
        return None
    stripped = {key: value for key, value in event.items() if key not in ("@timestamp", "message", "imguard")}
    stripped["event"] = {key: value for key, value in ev.items() if key not in ("id", "created")}
    ig = event.get("imguard", {})
    stripped["imguard"] = {key: (sorted(value) if key == "message" and isinstance(value, dict) else value)
                           for key, value in ig.items()}
    stripped["message"] = "message" in event
    return json.dumps(stripped, sort_keys=True, default=str)


# --- the pytest hooks: every event the test suite wrote --------------------------------------------------------
# tests/conftest.py imports these three. Events are read where the tests leave them: under pytest's basetemp
# (tmp_path) and in the temporary folders of session and module fixtures (the real gateways' data folders, made by
# tempfile.mkdtemp(prefix="imguard-...") in this process since the session started), at each module's end before
# its teardown (a fixture removes its folder when every test passed) and at the session's end. Any problem fails
# the session, listed in its summary. IMGUARD_ECS_CHECK=0 turns this off.

_suite = SuiteEvents()
_made_here: list[Path] = []          # the temporary folders this test process made (other sessions' are not ours)


def _enabled() -> bool:
    return os.environ.get("IMGUARD_ECS_CHECK", "1") != "0"


def pytest_sessionstart(session) -> None:
    """Note every tempfile.mkdtemp(prefix="imguard-...") of this process: the fixtures' folders."""
    import tempfile
    if not _enabled() or getattr(tempfile.mkdtemp, "_imguard_ecs", False):
        return
    original = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        path = original(*args, **kwargs)
        if os.path.basename(str(path)).startswith("imguard-"):
            _made_here.append(Path(path))
        return path
    mkdtemp._imguard_ecs = True
    tempfile.mkdtemp = mkdtemp


def _collect_temp_folders(config) -> None:
    # pytest's basetemp too: with other pytest sessions running at the same time it may be pruned before the end
    # (pytest keeps the newest three), so it is read at every module's end as well.
    folders = list(_made_here)
    try:
        folders.append(config._tmp_path_factory.getbasetemp())
    except (AttributeError, OSError):
        pass
    for folder in folders:
        if folder.exists():
            _suite.collect(folder)


try:
    import pytest as _pytest

    @_pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(item, nextitem):
        # Before the fixtures' teardown: only when module or session fixtures may go (the next test is in another
        # module, or there is none), which is where the gateways' folders are removed.
        if _enabled() and schema_available():
            # The test's own tmp_path now (other pytest sessions may prune this one's basetemp meanwhile); the
            # module's and session's folders when they may go.
            tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
            if isinstance(tmp_path, Path) and tmp_path.exists():
                _suite.collect(tmp_path)
            if nextitem is None or getattr(nextitem, "module", None) is not getattr(item, "module", None):
                _collect_temp_folders(item.config)
        yield
except ImportError:          # imported outside pytest
    pass


def pytest_sessionfinish(session, exitstatus) -> None:
    if not _enabled() or not session.items:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not schema_available():
        message = f"ECS check: no ECS data in {ECS_DIR}"
        if os.environ.get("CI"):
            session.exitstatus = 1
        if reporter is not None:
            reporter.write_line(message)
        return
    _collect_temp_folders(session.config)
    if _suite.checker is None or not _suite.checker.checked:
        return
    lines = _suite.report()
    if _suite.problems:
        session.exitstatus = 1
        lines.append("the session fails: make the events ECS, or document them in docs/events.md")
    if reporter is not None:
        reporter.section("events checked against ECS and docs/events.md (tests/ecs_schema.py)")
        for line in lines:
            reporter.write_line(line)
