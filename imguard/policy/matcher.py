"""Matching message text in time linear in its length: RE2, and every pattern of a policy in one set.

Python's `re` backtracks, so one crafted message can keep a pattern busy for seconds on the event loop that
serves every connection. RE2 (through `google-re2`) runs any pattern it accepts in time linear in the text,
and refuses what it cannot run that way (backreferences, lookahead, lookbehind): such a rule is refused at
load with its file:line, like any other error.

- `compile_regex(pattern)`: a rule's `regex:` in RE2 syntax. Python's Unicode meaning of `\\d \\w \\s` and
  their negations is kept (RE2's own are ASCII); `\\b` is RE2's ASCII word boundary. Raises PatternError.
- `guarded(body, before, after)`: `(?<![before])body(?![after])` without lookaround: the guards consume one
  character (or meet the text's edge) and the body is group `core`; `Scan.finditer` restarts each search on
  the core's last character, so successive matches are exactly those of the lookaround form.
- `PatternSet`: every text pattern of a policy (keywords, regexes, the detectors' candidates) added once and
  compiled into one RE2 set; `scan(text)` encodes the text once and learns in one pass which patterns occur
  (a `Scan`). Only the conditions whose patterns occur then look for where (spans, the first match).
"""

from __future__ import annotations

from typing import Iterator

import re2

WORD = r"\p{L}\p{N}_"                          # Python's \w on str (the same code points: tests check all)
SPACE = r"\t-\r\x{1c}-\x{1f}\x{85}\p{Z}"       # Python's \s on str
DIGIT = r"\p{Nd}"                              # Python's \d on str
CORE = "core"

_OUTSIDE = {"d": DIGIT, "D": r"\P{Nd}", "w": f"[{WORD}]", "W": f"[^{WORD}]", "s": f"[{SPACE}]",
            "S": f"[^{SPACE}]"}
_INSIDE = {"d": DIGIT, "D": r"\P{Nd}", "w": WORD, "s": SPACE}
_CONTINUATION = bytes(range(0x80, 0xC0))
DEFAULT_MEMORY = 64 << 20
_UNANCHORED = re2._Anchor.UNANCHORED


class PatternError(ValueError):
    """RE2 cannot run the pattern; the message says why."""


def options(max_memory: int = DEFAULT_MEMORY) -> re2.Options:
    o = re2.Options()
    o.log_errors = False
    o.max_mem = max_memory
    return o


def translate(pattern: str) -> str:
    """A pattern in Python's syntax -> RE2's, keeping the Unicode classes \\d \\w \\s (and negations)."""
    out: list[str] = []
    i, n, in_class = 0, len(pattern), False
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            e = pattern[i + 1]
            if in_class and e in "WS":
                raise PatternError(f"\\{e} inside [...] has no Unicode form in RE2 (write [^...] with \\w or \\s)")
            table = _INSIDE if in_class else _OUTSIDE
            out.append(table.get(e, c + e))
            i += 2
            continue
        if in_class:
            if c == "[" and pattern.startswith("[:", i):       # [:alpha:] inside a class
                end = pattern.find(":]", i + 2)
                if end > 0:
                    out.append(pattern[i:end + 2])
                    i = end + 2
                    continue
            if c == "]":
                in_class = False
            out.append(c)
            i += 1
            continue
        if c == "[":
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":         # a ']' first in a class is a literal
                j += 1
            out.append(pattern[i:j])
            in_class, i = True, j
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _compile(pattern: str, max_memory: int = DEFAULT_MEMORY):
    try:
        return re2.compile(pattern, options(max_memory))
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PatternError(str(reason)) from None


def compile_regex(pattern: str, max_memory: int = DEFAULT_MEMORY):
    """A rule's regex (Python syntax, Unicode classes) compiled by RE2; PatternError when RE2 cannot run it."""
    return _compile(translate(pattern), max_memory)


def guarded(body: str, before: str = "", after: str = "", flags: str = "") -> str:
    """`(?<![before])(?P<core>body)(?![after])` in RE2's syntax: the guards consume a character or meet an edge.
    `before`/`after` are class contents ('' = no guard)."""
    head = f"(?:^|[^{before}])" if before else ""
    tail = f"(?:[^{after}]|$)" if after else ""
    return f"{flags}{head}(?P<{CORE}>{body}){tail}"


class Offsets:
    """Byte offsets in UTF-8 (surrogates passed through) -> character offsets: every character has exactly
    one byte that is not 10xxxxxx. Counts on from the last answer, so offsets asked in order cost one pass."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._byte, self._char = 0, 0

    def char(self, offset: int) -> int:
        if offset < self._byte:
            self._byte, self._char = 0, 0
        self._char += len(self.data[self._byte:offset].translate(None, _CONTINUATION))
        self._byte = offset
        return self._char


class Scan:
    """One text, encoded once (UTF-8; a lone surrogate passes through as bytes RE2 never matches), with the
    set's verdict on which patterns occur in it (`hits`; None when unknown: each pattern is then searched
    alone, still in linear time). Offsets RE2 gives are bytes; `char()` turns them into the text's."""

    def __init__(self, text: str, patterns: "PatternSet | None" = None) -> None:
        self.text = text
        self.data = text.encode("utf-8", "surrogatepass")
        self.ascii = len(self.data) == len(text)
        self.patterns = patterns
        self.hits: set[int] | None = patterns.match(self.data) if patterns is not None else None
        self._known: dict[object, bool] = {}
        self._offsets: Offsets | None = None

    def hit(self, rx, index: int | None = None) -> bool:
        """Whether `rx` (pattern `index` of the set, when it is in it) occurs in the text."""
        if self.hits is not None and index is not None:
            return index in self.hits
        key = ("rx", id(rx)) if index is None else index
        found = self._known.get(key)
        if found is None:
            found = self._known[key] = self.find(rx) is not None
        return found

    def char(self, offset: int) -> int:
        """The text offset of byte `offset` (cheap when asked in increasing order, as spans come)."""
        if self.ascii:
            return offset
        if self._offsets is None:
            self._offsets = Offsets(self.data)
        return self._offsets.char(offset)

    def _last_char_start(self, start: int, end: int) -> int:
        p = end - 1
        while p > start and self.data[p] & 0xC0 == 0x80:
            p -= 1
        return p

    def finditer(self, rx, groups: tuple[str, ...] = ()) -> Iterator[tuple[int, int, str]]:
        """(start, end, group) in text offsets of each non-empty match of `rx`, in order, without overlaps.
        With `groups` (a `guarded` pattern: its core, or the named cores of a set of alternatives) the span is
        that of the first group that took part, and the next search starts on its last character (where the
        next guard may be); otherwise it is the whole match and the group ''."""
        data, pos, size = self.data, 0, len(self.data)
        numbered = [(name, rx.groupindex[name]) for name in groups]
        match = rx._regexp.Match        # RE2::Match as google-re2 binds it: every group's byte span, at C speed
        while pos <= size:
            spans = match(_UNANCHORED, data, pos, size)
            if spans[0][0] < 0:
                return
            name, group = next(((g, i) for g, i in numbered if spans[i][0] >= 0), ("", 0))
            start, end = spans[group]
            if end > start:
                yield self.char(start), self.char(end), name
                pos = self._last_char_start(start, end) if name else end
                if pos <= spans[0][0]:      # a one-character core at the very start: go past it
                    pos = end
            else:
                pos = max(spans[0][1], pos) + 1

    def find(self, rx, pos: int = 0) -> tuple[int, int] | None:
        """The byte span of the first match of `rx` at or after byte `pos`, or None."""
        span = rx._regexp.Match(_UNANCHORED, self.data, pos, len(self.data))[0]
        return span if span[0] >= 0 else None

    def search(self, rx, groups: tuple[str, ...] = ()) -> tuple[int, int, str] | None:
        return next(self.finditer(rx, groups), None)


class PatternSet:
    """Every pattern of a policy, compiled into one RE2 set: `scan(text)` says which occur, in one pass."""

    def __init__(self, max_memory: int = DEFAULT_MEMORY) -> None:
        self.max_memory = max_memory
        self.regexes: list = []
        self._index: dict[str, int] = {}
        self._set = None
        self._sentinel = -1

    def add(self, rx) -> int:
        """The index of the compiled pattern `rx` in the set; the same pattern added twice shares one index."""
        index = self._index.get(rx.pattern)
        if index is None:
            index = self._index[rx.pattern] = len(self.regexes)
            self.regexes.append(rx)
            self._set = None
        return index

    def compile(self) -> None:
        s = re2.Set.SearchSet(options(self.max_memory))
        for rx in self.regexes:
            s.Add(rx.pattern)
        # A pattern that matches every text: a result without it means RE2 gave up (its DFA ran out of
        # memory), and each pattern is then searched on its own instead.
        self._sentinel = s.Add("")
        try:
            s.Compile()
        except re2.error as exc:
            raise PatternError(f"the policy's patterns do not fit in {self.max_memory} bytes together") from exc
        self._set = s

    def match(self, data: bytes) -> set[int] | None:
        if self._set is None:
            self.compile()
        found = self._set.Match(data) or []
        if self._sentinel not in found:
            return None
        return set(found)

    def scan(self, text: str) -> Scan:
        return Scan(text, self)

    def __len__(self) -> int:
        return len(self.regexes)
