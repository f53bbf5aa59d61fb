"""YARA signatures: compile a folder of `.yar`/`.yara` files once, cache the compiled form on disk.

Engine: yara-python (libyara 4.5), chosen by measurement (docs/research inspection-notes, and
bench/bench_inspect.py). It releases the GIL while scanning, so the gateway's 2 worker threads scan on
both cores without stalling mitmproxy's event loop (1.9x with 2 threads; yara-x holds the GIL: 1.0x and
up to 40 ms loop stalls); its saved rules load 30-45x faster than yara-x's, and it compiles 4-10x faster.

Each file is its own namespace (its name without the suffix). A file that does not compile is refused
with the whole set: load_signatures() raises SignatureError listing every error as "file:line: message",
and nothing is half-loaded. The compiled rules are cached in `cache_dir` under a key made of the engine
name and version, the sha256 of the sorted sources and the externals schema; the cache file is written
atomically (temporary file + rename) and a cache that fails to load is recompiled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yara

ENGINE = "yara-python"
ENGINE_VERSION = f"{yara.__version__}/libyara-{yara.YARA_VERSION}"
SUFFIXES = (".yar", ".yara")

# External variables defined for every scan, with their compile-time defaults (which fix their types).
# The first five are LOKI/THOR's, so signature-base rules that use them compile and work.
EXTERNALS: dict[str, str | int] = {
    "filename": "",        # the claimed name of the file or member, without folders ("invoice.pdf")
    "filepath": "",        # its full path: "outer.zip!docs/invoice.pdf" (top level: the name)
    "extension": "",       # LOKI style: lower case, with the dot (".pdf"); "" when none
    "filetype": "",        # LOKI style short true type: "EXE", "ELF", "ZIP", "PDF", ... (see filetype.loki_filetype)
    "owner": "",           # the sender (LOKI: the file owner)
    "mime": "",            # the true MIME type from libmagic
    "protocol": "",        # "xmpp", "irc", "http", ... ("" outside a conversation)
    "direction": "",       # "outbound", "inbound", "internal" or ""
    "sender": "",          # the sender's identity
    "recipient": "",       # the recipients, comma separated
    "archive_depth": 0,    # 0 for the file itself, 1 for a member of it, ...
}
EXTERNALS_SCHEMA = json.dumps({k: type(v).__name__ for k, v in sorted(EXTERNALS.items())}, sort_keys=True)

_ERROR_LOCATION = re.compile(r"^(?P<file>.*?)\((?P<line>\d+)\): (?P<message>.*)$", re.S)
_LINE_ONLY = re.compile(r"^line (?P<line>\d+): (?P<message>.*)$", re.S)


class SignatureError(Exception):
    """The signature folder cannot be loaded; `errors` lists each problem as "file:line: message"."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass
class Signatures:
    """A compiled, ready-to-scan signature set. Immutable once built: reload by building a new one."""

    rules: Any                                   # yara.Rules (shared by all threads; match() is thread-safe)
    version: str                                 # short hash of the sources
    rule_names: frozenset[str]                   # "rule" and "namespace.rule" for every non-private rule
    files: tuple[str, ...] = ()                  # the source files, as given
    warnings: tuple[str, ...] = ()               # compiler warnings ("file:line: message"), e.g. slow strings
    from_cache: bool = False
    rule_count: int = 0
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)   # "namespace.rule" -> meta, for reference


def _format_error(text: str, path: Path) -> str:
    """yara's "file(line): message" (or "line N: message") as "file:line: message" with the real path."""
    match = _ERROR_LOCATION.match(text)
    if match:
        return f"{match['file']}:{match['line']}: {match['message']}"
    match = _LINE_ONLY.match(text)
    if match:
        return f"{path}:{match['line']}: {match['message']}"
    return f"{path}:0: {text}"


def _sources(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise SignatureError([f"{directory}:0: not a directory"])
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())


def _rule_names(rules: Any, namespace: str) -> tuple[set[str], dict[str, dict[str, Any]]]:
    names, meta = set(), {}
    for rule in rules:
        if rule.is_private:
            continue
        names.add(rule.identifier)
        names.add(f"{namespace}.{rule.identifier}")
        meta[f"{namespace}.{rule.identifier}"] = dict(rule.meta)
    return names, meta


def load_signatures(directory: Path, cache_dir: Path | None = None) -> Signatures:
    """Compile (or load from the cache) every .yar/.yara file of `directory`, one namespace per file."""
    directory = Path(directory)
    paths = _sources(directory)
    errors: list[str] = []
    namespaces: dict[str, Path] = {}
    digest = hashlib.sha256()
    for path in paths:
        namespace = path.stem
        if namespace in namespaces:
            errors.append(f"{path}:0: namespace {namespace!r} already used by {namespaces[namespace]}")
            continue
        namespaces[namespace] = path
        try:
            data = path.read_bytes()
        except OSError as exc:
            errors.append(f"{path}:0: cannot read: {exc.strerror or exc}")
            continue
        digest.update(namespace.encode() + b"\0" + hashlib.sha256(data).digest())
    if errors:
        raise SignatureError(errors)
    version = digest.hexdigest()[:12]

    # Compile each file alone: every broken file is reported at once (a combined compile stops at the
    # first error), and the rule names of each namespace are learned (yara.Rules does not say).
    names: set[str] = set()
    meta: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    cache_key = hashlib.sha256(
        f"{ENGINE}\0{ENGINE_VERSION}\0{digest.hexdigest()}\0{EXTERNALS_SCHEMA}".encode()).hexdigest()[:32]
    cache_file = Path(cache_dir) / f"signatures-{cache_key}.yarc" if cache_dir else None
    manifest_file = cache_file.with_suffix(".json") if cache_file else None

    cached = _load_cache(cache_file, manifest_file)
    if cached is not None:
        rules, manifest = cached
        return Signatures(rules=rules, version=version, rule_names=frozenset(manifest["rule_names"]),
                          files=tuple(str(p) for p in paths), warnings=tuple(manifest["warnings"]),
                          from_cache=True, rule_count=manifest["rule_count"], meta=manifest["meta"])

    for namespace, path in namespaces.items():
        try:
            single = yara.compile(filepath=str(path), externals=EXTERNALS)
        except yara.SyntaxError as exc:
            errors.append(_format_error(str(exc), path))
            continue
        except yara.Error as exc:
            errors.append(f"{path}:0: {exc}")
            continue
        file_names, file_meta = _rule_names(single, namespace)
        names |= file_names
        meta.update(file_meta)
        warnings.extend(_format_error(w, path) for w in single.warnings)
    if errors:
        raise SignatureError(errors)
    try:
        rules = yara.compile(filepaths={ns: str(p) for ns, p in namespaces.items()}, externals=EXTERNALS)
    except yara.Error as exc:   # e.g. a clash only visible when files are compiled together
        raise SignatureError([_format_error(str(exc), directory)]) from None
    rule_count = sum(1 for _ in rules)
    manifest = {"rule_names": sorted(names), "warnings": warnings, "rule_count": rule_count, "meta": meta,
                "engine": ENGINE, "engine_version": ENGINE_VERSION, "version": version}
    if cache_file is not None:
        _save_cache(rules, manifest, cache_file, manifest_file)
    return Signatures(rules=rules, version=version, rule_names=frozenset(names), files=tuple(str(p) for p in paths),
                      warnings=tuple(warnings), from_cache=False, rule_count=rule_count, meta=meta)


def _load_cache(cache_file: Path | None, manifest_file: Path | None) -> tuple[Any, dict[str, Any]] | None:
    if cache_file is None or not cache_file.exists() or not manifest_file.exists():
        return None
    try:
        manifest = json.loads(manifest_file.read_text())
        rules = yara.load(str(cache_file))
        if manifest.get("engine_version") != ENGINE_VERSION:
            return None
        return rules, manifest
    except (yara.Error, OSError, ValueError, KeyError):
        return None     # unreadable or from another engine version: compile again and overwrite


def _atomic_write(target: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _save_cache(rules: Any, manifest: dict[str, Any], cache_file: Path, manifest_file: Path) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # The manifest goes first: a cache file is only used when its manifest is there too.
        _atomic_write(manifest_file, lambda tmp: Path(tmp).write_text(json.dumps(manifest)))
        _atomic_write(cache_file, lambda tmp: rules.save(tmp))
    except (OSError, yara.Error):
        pass    # a cache we cannot write only costs a compile at the next start
