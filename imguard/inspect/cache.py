"""The verdict cache: a file that crossed a thousand times is inspected once.

    cache = VerdictCache(max_entries=10000, max_bytes=64 * MiB)       # one per Inspector (InspectLimits)
    report = cache.inspect(inspector, data, context, name, claimed_mime)

What is cached is the inspection's FileReport (the facts: type, hashes, YARA and engine findings, members), not
the decision: policy still decides every transfer in its own context (direction, parties, zones, hash lists) and
every transfer still gets its own event, archive record and quarantine copy. A hit costs one SHA-256 of the bytes
and one unpickling of the stored report (each caller gets its own copy, so a caller that adds a finding, as the
pipeline does for a truncated transfer, changes nothing in the cache).

The key is the file's SHA-256 with everything else the report depends on: the claimed name and MIME type (the
type-mismatch facts and YARA's filename/extension externals come from them), the values of the conversation's
YARA externals that the loaded rules mention at all (owner, sender, recipient, protocol, direction: a set that
names none of them shares one entry across every conversation), and the inspector's `version` (imguard's,
yara's and libmagic's versions, the signatures' version, each external engine's description, the limits).
The cache belongs to one Inspector: a reload builds a new inspector on the new signatures, so the old entries go
with the old inspector (the reloader's swap is the invalidation). The external engines' signatures change without
a reload (freshclam updates clamd's database in place; an ICAP vendor updates its service): every
`verdict_cache_recheck_seconds` the cache asks each engine for its state tag (clamd's VERSION, which names the
database version; the ICAP service's ISTag) and empties itself when one changed.

Concurrent inspections of one key are single-flight: the first caller inspects, the others wait for its report
(a copy each). A report that says a scan could not finish for a reason that may pass (a YARA or engine
timeout, an engine that was down: unscannable `timeout` or `scanner_error`) is handed to the callers that waited
for it but not kept, so the next transfer tries again. Bounded by entries and by the bytes of the stored reports,
least recently used first out.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from imguard.inspect.signatures import externals_mentioned
from imguard.model import REASON_SCANNER_ERROR, REASON_TIMEOUT, UNSCANNABLE, ChatContext, FileReport

# Unscannable reasons that may not hold for the next transfer of the same bytes: not cached.
TRANSIENT_REASONS = frozenset({REASON_TIMEOUT, REASON_SCANNER_ERROR})
# YARA externals (signatures.EXTERNALS) whose value comes from the conversation, not from the bytes or the name.
log = logging.getLogger(__name__)

CONTEXT_EXTERNALS = ("owner", "sender", "recipient", "protocol", "direction")


def cacheable(report: FileReport) -> bool:
    return not any(f.kind == UNSCANNABLE and f.data.get("reason") in TRANSIENT_REASONS
                   for r in report.walk() for f in r.findings)


def context_externals_used(files: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The context externals the signature sources mention as words (over-approximated: a mention in a comment
    counts too, which only costs hits). A file that cannot be read counts as mentioning all of them."""
    if not files:
        return ()
    used = externals_mentioned(files, CONTEXT_EXTERNALS)
    return tuple(name for name in CONTEXT_EXTERNALS if name in used)


def context_values(ctx: ChatContext, names: tuple[str, ...]) -> tuple[str, ...]:
    values = {"owner": ctx.sender, "sender": ctx.sender, "recipient": ",".join(ctx.recipients),
              "protocol": ctx.protocol, "direction": ctx.direction}
    return tuple(values[name] for name in names)


@dataclass
class _Flight:
    """One inspection under way; the callers of the same key wait on `done`."""
    done: threading.Event = field(default_factory=threading.Event)
    blob: bytes | None = None


@dataclass
class CacheStats:
    hits: int = 0           # answered from the cache
    misses: int = 0         # inspected
    waits: int = 0          # answered by an inspection another caller ran at the same time
    evictions: int = 0
    uncached: int = 0       # inspected, not kept (a transient unscannable reason, or larger than max_bytes)
    invalidations: int = 0  # emptied because an engine's state tag changed (recheck)


class VerdictCache:
    def __init__(self, max_entries: int, max_bytes: int, version: str = "",
                 context_names: tuple[str, ...] = CONTEXT_EXTERNALS, engines: tuple = (),
                 recheck_seconds: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.version = version
        self.context_names = context_names
        # The external engines whose signatures may change under a running inspector (state_tag()).
        self.engines = tuple(e for e in engines if hasattr(e, "state_tag"))
        self.recheck_seconds, self.clock = recheck_seconds, clock
        self._tags: tuple[str, ...] | None = None
        self._next_check = 0.0
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0
        self._flights: dict[tuple, _Flight] = {}
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def recheck(self) -> bool:
        """Ask the engines for their state tags when `recheck_seconds` have passed; a tag that changed empties the
        cache (True). An engine that does not answer keeps its last tag: its scans fail and are not cached."""
        if not self.engines or self.recheck_seconds <= 0:
            return False
        now = self.clock()
        with self._lock:
            if now < self._next_check:
                return False
            self._next_check = now + self.recheck_seconds
            old = self._tags
        tags = []
        for i, engine in enumerate(self.engines):
            try:
                tags.append(str(engine.state_tag()))
            except Exception as exc:            # down or garbled: keep what we knew
                log.debug("verdict cache: %s gave no state tag: %s", engine.describe(), exc)
                tags.append(old[i] if old else "")
        new = tuple(tags)
        with self._lock:
            self._tags = new
            changed = old is not None and new != old
            if changed:
                self._entries.clear()
                self._bytes = 0
                self.stats.invalidations += 1
        if changed:
            log.info("verdict cache emptied: an engine's signatures changed (%s)", "; ".join(new))
        return changed

    def key(self, data: bytes, ctx: ChatContext, name: str, claimed_mime: str) -> tuple:
        self.recheck()
        return (hashlib.sha256(data).digest(), name, claimed_mime, context_values(ctx, self.context_names),
                self.version)

    def get_or_inspect(self, key: tuple, inspect: Callable[[], FileReport]) -> FileReport:
        """The report for `key`: from the cache, from an inspection under way for the same key, or from
        `inspect()` (run here, once, whatever the number of callers waiting for it)."""
        with self._lock:
            blob = self._entries.get(key)
            if blob is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
            else:
                flight = self._flights.get(key)
                leader = flight is None
                if leader:
                    flight = self._flights[key] = _Flight()
                    self.stats.misses += 1
                else:
                    self.stats.waits += 1
        if blob is not None:
            return pickle.loads(blob)
        if not leader:
            flight.done.wait()
            if flight.blob is not None:
                return pickle.loads(flight.blob)
            return inspect()            # the leader failed without a report: inspect on our own
        try:
            report = inspect()
            flight.blob = pickle.dumps(report, pickle.HIGHEST_PROTOCOL)
            self._store(key, flight.blob, cacheable(report))
        finally:
            with self._lock:
                self._flights.pop(key, None)
            flight.done.set()
        return report

    def _store(self, key: tuple, blob: bytes, keep: bool) -> None:
        with self._lock:
            if not keep or len(blob) > self.max_bytes or self.max_entries <= 0:
                self.stats.uncached += 1
                return
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._entries[key] = blob
            self._bytes += len(blob)
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= len(dropped)
                self.stats.evictions += 1

    def inspect(self, inspector: Any, data: bytes | bytearray | memoryview, ctx: ChatContext, name: str,
                claimed_mime: str) -> FileReport:
        data = bytes(data) if not isinstance(data, bytes) else data
        key = self.key(data, ctx, name, claimed_mime)
        return self.get_or_inspect(key, lambda: inspector.inspect_uncached(data, ctx, name, claimed_mime,
                                                                         sha256=key[0].hex()))


def inspector_version(inspector: Any) -> str:
    """What the reports of `inspector` depend on besides the bytes: the versions of imguard, yara and libmagic,
    the signatures' version, each external engine's description, the limits."""
    import yara

    import imguard
    try:
        import magic
        libmagic = str(magic.version())
    except Exception:           # python-magic without version(): the magic database still comes with the OS
        libmagic = "?"
    parts = [imguard.__version__, yara.__version__, str(getattr(yara, "YARA_VERSION", "")), libmagic,
             str(getattr(inspector.signatures, "version", "")), repr(inspector.limits)]
    parts += [str(engine.describe()) for engine in getattr(inspector, "engines", ())]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def for_inspector(inspector: Any) -> VerdictCache | None:
    """The cache an Inspector keeps, from its limits (verdict_cache_entries, verdict_cache_bytes); None when off."""
    limits = inspector.limits
    entries, size = getattr(limits, "verdict_cache_entries", 0), getattr(limits, "verdict_cache_bytes", 0)
    if entries <= 0 or size <= 0:
        return None
    return VerdictCache(entries, size, inspector_version(inspector),
                        context_externals_used(getattr(inspector.signatures, "files", ())),
                        engines=tuple(getattr(inspector, "engines", ())),
                        recheck_seconds=getattr(limits, "verdict_cache_recheck_seconds", 0.0))
