"""YARA signatures: compile a folder of `.yar`/`.yara` files once, cache the compiled form on disk.

Engine: yara-python (libyara 4.5), chosen by measurement (docs/research inspection-notes, and
bench/bench_inspect.py). It releases the GIL while scanning, so the gateway's 2 worker threads scan on
both cores without stalling mitmproxy's event loop (1.9x with 2 threads; yara-x holds the GIL: 1.0x and
up to 40 ms loop stalls); its saved rules load 30-45x faster than yara-x's, and it compiles 4-10x faster.

Each top-level file is its own namespace (its name without the suffix), unless the folder has an index.yar
(then that file and what it includes are the set, in one namespace) or SignatureSettings names one namespace
for the whole folder. Every file the set reads, included ones too, is read once before compiling (_Tree): for
the cache key, for each rule's file:line, and to report imports of modules this engine lacks with file:line
(refused, or left out with a warning). A file that does not compile is refused with the whole set:
load_signatures() raises SignatureError listing every error as "file:line: message", and nothing is
half-loaded. The compiled rules are cached in `cache_dir` under a key made of the engine name and version, the
sha256 of every file read and the externals schema; the cache file is written atomically (temporary file +
rename) and a cache that fails to load is recompiled.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yara

from imguard.settings import setting

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


# The modules this engine has (yara-python's build): a rule importing another one is reported with file:line.
MODULES: tuple[str, ...] = tuple(sorted(getattr(yara, "modules", ())))
INDEX_NAMES = ("index.yar", "index.yara")      # a folder with one of these loads it as its entry point

_INCLUDE = re.compile(rb'^[ \t]*include[ \t]+"([^"\r\n]+)"', re.M)
_IMPORT = re.compile(rb'^[ \t]*import[ \t]+"([^"\r\n]+)"', re.M)
_RULE = re.compile(rb"^[ \t]*(?:(?:private|global)[ \t]+)*rule[ \t]+([A-Za-z_][A-Za-z0-9_]*)", re.M)


@dataclass(frozen=True)
class SignatureSettings:
    """YARA signature sets"""
    signature_namespace: str = setting(
        "", "One YARA namespace for every file of the signatures folder, so a rule may use a rule of another file "
            "(files are compiled in name order: a rule must come after the rules it uses). '' = one namespace per "
            "file, its name without the suffix. A folder with an index.yar is loaded through it (its includes) "
            "in the namespace 'index', or this one.")
    hash_lists: str = setting(
        "", "Folders of hash lists (known-bad or known-good SHA-256/SHA-1/MD5, one per line: NAME.txt is the list "
            "NAME that the policy conditions hash_list and file_hash_list name), comma separated, read beside each "
            "rules folder's hashlists/. Reloaded with the rules; a bad line refuses the reload with file:line.")
    skip_missing_modules: bool = setting(
        False, "Leave out, with a warning, the files that import a YARA module this engine lacks (cuckoo, magic, "
               "dex, macho, ...) instead of refusing the whole signatures folder. Each is reported as file:line.")


class SignatureError(Exception):
    """The signature folder cannot be loaded; `errors` lists each problem as "file:line: message"."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


class RuleNames(frozenset):
    """The names of the loaded rules ("rule" and "namespace.rule"), and where each is defined:
    `sources["namespace.rule"]` is "file:line" (relative to the signatures folder). Policy's `yara_file`
    conditions use it."""
    sources: dict[str, str]

    def __new__(cls, names=(), sources: dict[str, str] | None = None) -> "RuleNames":
        self = super().__new__(cls, names)
        self.sources = dict(sources or {})
        return self


@dataclass
class Signatures:
    """A compiled, ready-to-scan signature set. Immutable once built: reload by building a new one."""

    rules: Any                                   # yara.Rules (shared by all threads; match() is thread-safe)
    version: str                                 # short hash of the sources
    rule_names: RuleNames                        # "rule" and "namespace.rule" for every non-private rule
    files: tuple[str, ...] = ()                  # the source files loaded (includes too)
    warnings: tuple[str, ...] = ()               # compiler warnings ("file:line: message"), e.g. slow strings
    from_cache: bool = False
    rule_count: int = 0
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)   # "namespace.rule" -> meta, for reference
    skipped: tuple[str, ...] = ()                # "file:line: message" for each file left out (a missing module)
    unused: tuple[str, ...] = ()                 # top-level files not loaded (the folder's index.yar is its entry)
    mentioned: frozenset[str] | None = None      # EXTERNALS the bytes compiled mention (load_signatures)

    @functools.cached_property
    def externals_used(self) -> frozenset[str]:
        """The EXTERNALS the sources mention as words, over-approximated (a mention in a comment or a string counts
        too): from the bytes load_signatures read for the compiled set, else from `files` now, all of them when
        there is no source to read (rules built elsewhere) or one cannot be read. A rule can only see an external it
        names, so one not in this set cannot change what the rules match."""
        return self.mentioned if self.mentioned is not None else externals_mentioned(self.files)


TYPE_EXTERNALS = ("mime", "filetype")       # the externals whose value comes from libmagic


def externals_mentioned(files: tuple[str, ...] | list[str],
                        names: tuple[str, ...] = tuple(EXTERNALS)) -> frozenset[str]:
    """Which of the externals `names` the source files mention as words; all of them without files or when one
    cannot be read."""
    if not files:
        return frozenset(names)
    try:
        return _mentioned([Path(path).read_bytes() for path in files], names)
    except OSError:
        return frozenset(names)


def _mentioned(texts: list[bytes], names: tuple[str, ...]) -> frozenset[str]:
    words = {name: re.compile(rb"\b" + re.escape(name.encode()) + rb"\b") for name in names}
    # One literal search per name (fast), the word boundaries checked only where it occurs at all.
    return frozenset(name for name, word in words.items()
                     if any(name.encode() in text and word.search(text) for text in texts))


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


def _lines(data: bytes, pattern: re.Pattern) -> list[tuple[bytes, int]]:
    """Each match of `pattern` (its group 1) with its line number, counting newlines once."""
    out, line, last = [], 1, 0
    for m in pattern.finditer(data):
        line += data.count(b"\n", last, m.start())
        last = m.start()
        out.append((m[1], line))
    return out


def _absolute(path: str | Path) -> str:
    """A path as the set's key for a file: absolute and normalised (no symlink resolution: cheap for 700 files)."""
    return os.path.normpath(os.path.abspath(path))


MAX_INCLUDE_DEPTH = 32      # include chains longer than this are refused (a loop through symlinks ends here)


@dataclass
class _File:
    """One source file as read before compiling: what it includes, imports and defines."""
    path: str                                                                 # _absolute()
    data: bytes
    includes: list[str] = field(default_factory=list)
    missing_modules: list[tuple[str, int]] = field(default_factory=list)      # (module, line)

    def rules(self) -> dict[str, int]:
        """Rule name -> line of its declaration (read only when compiling: the cache has them)."""
        found: dict[str, int] = {}
        for name, line in _lines(self.data, _RULE):
            found.setdefault(name.decode(), line)
        return found


class _Tree:
    """Every file a set reads (top-level files and, recursively, what they include), read once: its hash is
    the cache key, and the files needing a module this engine lacks are known before compiling."""

    def __init__(self) -> None:
        self.files: dict[str, _File] = {}
        self.errors: list[str] = []

    def read(self, path: str, stack: tuple[str, ...] = ()) -> None:
        path = _absolute(path)
        if path in stack or len(stack) > MAX_INCLUDE_DEPTH:
            self.errors.append(f"{stack[-1]}:0: include cycle through {path}")
            return
        if path in self.files:
            return
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            where = f"{stack[-1]}:0: included file " if stack else f"{path}:0: "
            self.errors.append(f"{where}{path}: cannot read: {exc.strerror or exc}")
            return
        entry = self.files[path] = _File(path, data)
        if b"import" in data:
            for module, line in _lines(data, _IMPORT):
                if module.decode("utf-8", "replace") not in MODULES:
                    entry.missing_modules.append((module.decode("utf-8", "replace"), line))
        if b"include" in data:
            for name, _ in _lines(data, _INCLUDE):
                target = _absolute(os.path.join(os.path.dirname(path), name.decode("utf-8", "surrogateescape")))
                entry.includes.append(target)
                self.read(target, stack + (path,))

    def below(self, path: str) -> list[_File]:
        """The file and everything it includes, each once, in include order."""
        seen: dict[str, _File] = {}

        def visit(p: str) -> None:
            if p in seen or p not in self.files:
                return
            seen[p] = self.files[p]
            for q in self.files[p].includes:
                visit(q)
        visit(_absolute(path))
        return list(seen.values())


def _shown(path: str, directory: str) -> str:
    """A file of the set as it is named in `sources` and the cache key: relative to the signatures folder."""
    prefix = directory.rstrip(os.sep) + os.sep
    return path[len(prefix):] if path.startswith(prefix) else path


def _located(message: str, tree: _Tree) -> str:
    """A file name in a YARA message as a plain path: "/set/./sub/b.yar" normalised; a relative one (as an
    include statement wrote it) as the path of the file read that ends so, when exactly one does."""
    name, sep, rest = message.partition(":")
    if not sep:
        return message
    if os.path.isabs(name):
        return f"{os.path.normpath(name)}:{rest}"        # "/set/./sub/b.yar" -> "/set/sub/b.yar"
    tail = os.sep + os.path.normpath(name)
    found = [p for p in tree.files if p.endswith(tail)] if ".." not in tail else []
    return f"{found[0]}:{rest}" if len(found) == 1 else message


def _include_source(paths: list[str]) -> str:
    return "".join(f'include "{p}"\n' for p in paths)


def _serve(tree: _Tree, skipped: set[str]) -> Any:
    """An include callback serving the files as read, with the skipped ones empty. Only used when a skipped
    file is included by another (else YARA reads the files itself, byte for byte)."""
    def callback(requested: str, including: str | None, namespace: str) -> str | None:
        target = _absolute(os.path.join(os.path.dirname(including), requested) if including else requested)
        if target in skipped:
            return "// left out: imports a module this engine lacks\n"
        entry = tree.files.get(target)
        data = entry.data if entry is not None else Path(target).read_bytes()
        # Served texts are UTF-8 (yara-python's callback takes str); the includes in them are made absolute.
        return _INCLUDE.sub(lambda m: b'include "' + _absolute(os.path.join(os.path.dirname(target), m[1].decode()))
                            .encode() + b'"', data).decode("utf-8")
    return callback


def load_signatures(directory: Path, cache_dir: Path | None = None,
                    settings: SignatureSettings | None = None) -> Signatures:
    """Compile (or load from the cache) the signature set of `directory`: its index.yar (and what it includes) if
    it has one, else every top-level .yar/.yara file, one namespace per file (or settings.signature_namespace)."""
    directory = Path(directory)
    settings = settings or SignatureSettings()
    paths = _sources(directory)
    errors: list[str] = []
    index = next((p for p in paths if p.name.lower() in INDEX_NAMES), None)
    units: dict[str, list[Path]] = {}
    unused: list[str] = []
    if index is not None:
        units[settings.signature_namespace or index.stem] = [index]
    elif settings.signature_namespace:
        units[settings.signature_namespace] = paths
    else:
        first: dict[str, Path] = {}
        for path in paths:
            if path.stem in first:
                errors.append(f"{path}:0: namespace {path.stem!r} already used by {first[path.stem]}")
                continue
            first[path.stem] = path
            units[path.stem] = [path]
    top = _absolute(directory)
    tree = _Tree()
    for unit_paths in units.values():
        for path in unit_paths:
            tree.read(os.path.join(top, path.name))
    errors.extend(tree.errors)
    if index is not None:
        unused = [f"{p}:0: not loaded: {index.name} is the folder's entry point and does not include it"
                  for p in paths if os.path.join(top, p.name) not in tree.files]

    # Files importing a module this engine lacks: an error naming each, or (settings) left out with a warning.
    skipped: dict[str, str] = {}
    for entry in tree.files.values():
        for module, line in entry.missing_modules:
            message = (f"{entry.path}:{line}: imports module {module!r}, which this engine lacks "
                       f"(it has: {', '.join(MODULES)})")
            if settings.skip_missing_modules:
                skipped.setdefault(entry.path, message + "; file left out")
            else:
                errors.append(message + " (--skip-missing-modules leaves such files out)")
    if errors:
        raise SignatureError(errors)

    digest = hashlib.sha256()
    for namespace, unit_paths in units.items():
        digest.update(namespace.encode() + b"\0")
        for path in unit_paths:
            for entry in tree.below(os.path.join(top, path.name)):
                digest.update(_shown(entry.path, top).encode() + b"\0" + hashlib.sha256(entry.data).digest())
    digest.update(json.dumps(sorted(_shown(p, top) for p in skipped)).encode())
    version = digest.hexdigest()[:12]
    loaded_files = [entry.path for entry in tree.files.values() if entry.path not in skipped]
    mentioned = _mentioned([entry.data for entry in tree.files.values() if entry.path not in skipped],
                           tuple(EXTERNALS))

    cache_key = hashlib.sha256(
        f"{ENGINE}\0{ENGINE_VERSION}\0{digest.hexdigest()}\0{EXTERNALS_SCHEMA}".encode()).hexdigest()[:32]
    cache_file = Path(cache_dir) / f"signatures-{cache_key}.yarc" if cache_dir else None
    manifest_file = cache_file.with_suffix(".json") if cache_file else None

    cached = _load_cache(cache_file, manifest_file)
    if cached is not None:
        rules, manifest = cached
        return Signatures(rules=rules, version=version,
                          rule_names=RuleNames(manifest["rule_names"], manifest.get("sources")),
                          files=tuple(loaded_files), warnings=tuple(manifest["warnings"]),
                          from_cache=True, rule_count=manifest["rule_count"], meta=manifest["meta"],
                          skipped=tuple(skipped.values()), unused=tuple(unused), mentioned=mentioned)

    # A skipped file that another includes is served empty through an include callback; otherwise YARA reads
    # the files itself.
    included = {q for entry in tree.files.values() for q in entry.includes}
    callback = _serve(tree, set(skipped)) if set(skipped) & included else None
    unit_files = {ns: [os.path.join(top, p.name) for p in ps] for ns, ps in units.items()}
    unit_sources = {ns: _include_source([p for p in ps if p not in skipped]) for ns, ps in unit_files.items()}

    def compile_sources(sources: dict[str, str]) -> Any:
        extra = {"include_callback": callback} if callback is not None else {}
        return yara.compile(sources=sources, externals=EXTERNALS, **extra)

    # Compile each namespace alone: every broken file is reported at once (a combined compile stops at the
    # first error), and the rule names of each namespace are learned (yara.Rules does not say).
    names: set[str] = set()
    sources: dict[str, str] = {}
    meta: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for namespace, source in unit_sources.items():
        try:
            single = compile_sources({namespace: source})
        except yara.SyntaxError as exc:
            errors.append(_located(_format_error(str(exc), directory), tree))
            continue
        except (yara.Error, UnicodeDecodeError, OSError) as exc:
            errors.append(f"{units[namespace][0]}:0: {exc}")
            continue
        defined = {name: (entry.path, line) for path in unit_files[namespace] for entry in tree.below(path)
                   if entry.path not in skipped for name, line in entry.rules().items()}
        for rule in single:
            if rule.is_private:
                continue
            full = f"{namespace}.{rule.identifier}"
            names.update((rule.identifier, full))
            meta[full] = dict(rule.meta)
            if rule.identifier in defined:
                path, line = defined[rule.identifier]
                sources[full] = f"{_shown(path, top)}:{line}"
        warnings.extend(_located(_format_error(w, directory), tree) for w in single.warnings)
    if errors:
        raise SignatureError(errors)
    try:
        rules = compile_sources(unit_sources)
    except yara.Error as exc:   # e.g. a clash only visible when files are compiled together
        raise SignatureError([_format_error(str(exc), directory)]) from None
    rule_count = sum(1 for _ in rules)
    manifest = {"rule_names": sorted(names), "sources": sources, "warnings": warnings, "rule_count": rule_count,
                "meta": meta, "engine": ENGINE, "engine_version": ENGINE_VERSION, "version": version}
    if cache_file is not None:
        _save_cache(rules, manifest, cache_file, manifest_file)
    return Signatures(rules=rules, version=version, rule_names=RuleNames(names, sources),
                      files=tuple(str(p) for p in loaded_files), warnings=tuple(warnings), from_cache=False,
                      rule_count=rule_count, meta=meta, skipped=tuple(skipped.values()), unused=tuple(unused),
                      mentioned=mentioned)


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
