"""Suppression of repeated identical alerts for the remote sinks, with a count (the local log keeps all).

Two alerts are the same when they have the same kind (dataset), action, rule ids, sender, recipients,
transfer mechanism and content:
the file's SHA-256, the message text's SHA-256, or the anomaly's kind and detail. The first one in a
window of `window` seconds is sent; the rest in that window are counted, not sent. Each event that is
sent stands for itself plus `imguard.suppressed_count` others:

- the next identical alert after the window carries the count of those suppressed before it, or
- when the window has passed with suppressed alerts and no new one, `expire()` returns the last of them
  (with `imguard.suppressed_count` = the others), so a burst followed by silence is still counted.

Plain events (kind "event", such as an allowed message) and imguard's own sink events are never
suppressed. The table is bounded (`max_keys`); an entry pushed out early is returned by `expire()`.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from typing import Any, Callable


def dedup_key(event: dict[str, Any]) -> tuple | None:
    ev = event.get("event", {})
    if ev.get("kind") != "alert" or ev.get("dataset") == "imguard.sink":
        return None
    ig = event.get("imguard", {})
    rules = event.get("rule", {}).get("id", "")
    content = (event.get("file", {}).get("hash", {}).get("sha256")
               or ig.get("message", {}).get("sha256")
               or "")
    if not content and "anomaly" in ig:
        anomaly = ig["anomaly"]
        anomaly_text = f"{anomaly.get('kind')}\0{anomaly.get('detail')}"
        content = hashlib.sha256(anomaly_text.encode("utf-8", "replace")).hexdigest()
    if not content and "tls" in ig:
        content = hashlib.sha256(str(ig["tls"].get("detail")).encode("utf-8", "replace")).hexdigest()
    sender = event.get("source", {}).get("user", {}).get("name", "")
    recipients = str(event.get("destination", {}).get("user", {}).get("name", ""))
    mechanism = ig.get("context", {}).get("transfer_mechanism", "")
    return (ev.get("dataset"), ev.get("action"), str(rules), sender, recipients, mechanism, content)


class _Entry:
    __slots__ = ("first", "count", "last")

    def __init__(self, first: float):
        self.first, self.count, self.last = first, 0, None


class Deduplicator:
    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic, max_keys: int = 10000):
        self.window = window
        self.clock = clock
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._table: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()
        self._evicted: list[dict[str, Any]] = []
        self.suppressed = 0           # total suppressed since start

    def filter(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """The event to send (maybe carrying a count), or None when it is a suppressed repeat."""
        if self.window <= 0:
            return event
        key = dedup_key(event)
        if key is None:
            return event
        now = self.clock()
        with self._lock:
            entry = self._table.get(key)
            if entry is not None and now - entry.first < self.window:
                entry.count += 1
                entry.last = event
                self.suppressed += 1
                return None
            if entry is not None:
                del self._table[key]
                if entry.count:
                    event.setdefault("imguard", {})["suppressed_count"] = entry.count
            self._table[key] = _Entry(now)
            while len(self._table) > self.max_keys:
                _, old = self._table.popitem(last=False)
                if old.count:
                    self._evicted.append(_summary(old))
            return event

    def expire(self, flush_all: bool = False) -> list[dict[str, Any]]:
        """Summaries of windows that have passed with suppressed alerts (all windows when flush_all)."""
        if self.window <= 0:
            return []
        now = self.clock()
        with self._lock:
            out, self._evicted = self._evicted, []
            for key in list(self._table):
                entry = self._table[key]
                if flush_all or now - entry.first >= self.window:
                    del self._table[key]
                    if entry.count:
                        out.append(_summary(entry))
        return out


def _summary(entry: _Entry) -> dict[str, Any]:
    event = entry.last
    if entry.count > 1:
        event.setdefault("imguard", {})["suppressed_count"] = entry.count - 1
    return event
