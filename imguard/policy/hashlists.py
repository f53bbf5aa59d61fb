"""Hash lists: files of known-bad (or known-good) file hashes that policy rules name (`hash_list: known-bad`).

    lists, errors = load_hash_lists([Path("rules/hashlists"), Path("/var/lib/feeds")])
    lists["known-bad"].lookup(sha256=report.sha256)    # -> Listed(digest, value, name, source) or None

A list is one file, `NAME.txt`, in a hash-list folder (each rules folder's `hashlists/`, and the folders of the
`hash_lists` setting); its name is the file's stem. The bundled policy's lists (rules/hashlists: `known-bad`, which
its `malware` rule names) are always there as defaults, so a rules folder made of copies of the bundled rule files
still loads; a list of the same name in another folder replaces the bundled one. The format is the one threat-intel
feeds publish (abuse.ch MalwareBazaar's `full_sha256.txt`, `sha256sum` output, most IOC exports):

    # comment lines and blank lines are ignored
    275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f  EICAR test file   <- hash, then a name
    44d88612fea8a8f36de82e1278abb02f                                   <- MD5 (32 hex), SHA-1 (40) or SHA-256 (64)
    3395856ce81f2b7382dee72602f798b642f14140 # EICAR (sha1)           <- or a trailing # comment

A line that is not a hash is an error `file:line: ...`; loading is all-or-nothing like the rules, so a reload with
a broken list keeps the lists in force. Pure: the standard library only, no I/O but reading the files.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

HASHLIST_FOLDER = "hashlists"             # the folder of lists inside each rules folder
HASHLIST_SUFFIXES = (".txt",)
DIGEST_BY_LENGTH = {32: "md5", 40: "sha1", 64: "sha256"}
MAX_NAME_CHARS = 200                      # the name kept per hash (the rest of a long comment is dropped)

_HEX = re.compile(r"^[0-9A-Fa-f]+$")
_LIST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Listed:
    """Why a file is on a list: which of its digests, the value, the entry's name and where the entry is."""
    digest: str                 # "sha256", "sha1" or "md5"
    value: str
    name: str                   # the entry's name or comment ("" when the line has none)
    source: str                 # "known-bad.txt:12"


@dataclass
class HashList:
    name: str
    path: str
    entries: dict[str, dict[str, tuple[str, int]]] = field(default_factory=dict)   # digest -> value -> (name, line)

    def __len__(self) -> int:
        return sum(len(values) for values in self.entries.values())

    def lookup(self, sha256: str = "", sha1: str = "", md5: str = "") -> Listed | None:
        for digest, value in (("sha256", sha256), ("sha1", sha1), ("md5", md5)):
            if value:
                found = self.entries.get(digest, {}).get(value.lower())
                if found is not None:
                    return Listed(digest, value.lower(), found[0], f"{Path(self.path).name}:{found[1]}")
        return None


def parse_hash_list(text: str, name: str, path: str, errors: list[str], label: str = "") -> HashList:
    """The entries of one list file; each bad line is appended to `errors` as 'label:line: message'."""
    hash_list = HashList(name, path)
    label = label or Path(path).name
    for number, line in enumerate(text.removeprefix("\ufeff").splitlines(), 1):     # a BOM some tools write
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        value, _, rest = stripped.replace("\t", " ").partition(" ")
        value = value.rstrip(",;")
        rest = rest.strip()
        if rest.startswith("#"):
            rest = rest[1:].strip()
        digest = DIGEST_BY_LENGTH.get(len(value))
        if digest is None or not _HEX.match(value):
            shown = value if len(value) <= 80 else value[:77] + "..."
            errors.append(f"{label}:{number}: {shown!r} is not a hash: a line is an MD5 (32 hex digits), SHA-1 (40) "
                          f"or SHA-256 (64), then an optional name; '#' starts a comment")
            continue
        hash_list.entries.setdefault(digest, {}).setdefault(value.lower(), (rest[:MAX_NAME_CHARS], number))
    return hash_list


def list_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in HASHLIST_SUFFIXES and p.is_file())
    except OSError:
        return []


def bundled_folder() -> Path:
    from imguard.runtime import bundled          # the installed copy, else the checkout's
    return bundled("rules") / HASHLIST_FOLDER


def folders_of(rules_dirs: Iterable[Path], extra: str | Iterable[Path] = "") -> list[Path]:
    """The hash-list folders besides the bundled one: each rules folder's `hashlists/` (when there is one), then the
    extra folders (the `hash_lists` setting: comma separated, or a list), in that order."""
    folders = [Path(d) / HASHLIST_FOLDER for d in rules_dirs if (Path(d) / HASHLIST_FOLDER).is_dir()]
    items = [p.strip() for p in extra.split(",")] if isinstance(extra, str) else [str(p) for p in extra]
    return folders + [Path(p) for p in items if p]


@dataclass
class HashLists:
    """Every list loaded, by name, and a digest of their content (part of the policy version)."""
    lists: dict[str, HashList] = field(default_factory=dict)
    version: str = ""

    def __contains__(self, name: str) -> bool:
        return name in self.lists

    def __getitem__(self, name: str) -> HashList:
        return self.lists[name]

    def summary(self) -> str:
        return ", ".join(f"{name} ({len(hl)})" for name, hl in sorted(self.lists.items())) or "none"


def load_hash_lists(folders: Iterable[Path], defaults: Path | None = None) -> tuple[HashLists, list[str]]:
    """Every `*.txt` of the folders as a list named by its stem, and the errors ('file:line: message'). A folder
    given but missing, or two lists of one name, is an error too. The lists of `defaults` (the bundled folder)
    are loaded first and give way to a list of the same name in `folders`."""
    errors: list[str] = []
    loaded = HashLists()
    digest = hashlib.sha256()
    folders = [Path(f) for f in folders]
    given = {f.resolve() for f in folders if f.is_dir()}
    default_names: set[str] = set()
    if defaults is not None and defaults.is_dir() and defaults.resolve() not in given:
        names = {p.stem for folder in given for p in list_files(folder)}
        default_names = {p.stem for p in list_files(defaults) if p.stem not in names}
        folders.insert(0, defaults)
    for folder in folders:
        if not folder.is_dir():
            errors.append(f"{folder}:1: hash list folder does not exist")
            continue
        for path in list_files(folder):
            name = path.stem
            if folder is defaults and name not in default_names:
                continue                # replaced by a list of the same name
            if not _LIST_NAME.match(name):
                errors.append(f"{path}:1: a hash list's name (its file name without .txt) is letters, digits and "
                              f"- _ . (max 128), not {name!r}")
                continue
            if name in loaded.lists:
                errors.append(f"{path}:1: a second hash list named {name!r} (first: {loaded.lists[name].path})")
                continue
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append(f"{path}:1: not UTF-8 text: {exc}")
                continue
            except OSError as exc:
                errors.append(f"{path}:1: cannot read: {exc.strerror or exc}")
                continue
            digest.update(f"{name}\0{text}\0".encode())
            loaded.lists[name] = parse_hash_list(text, name, str(path), errors, str(path))
    loaded.version = digest.hexdigest()[:12] if loaded.lists else ""
    return loaded, errors
