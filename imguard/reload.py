"""Hot reload of rules and signatures: validated first, swapped whole, recorded; a broken file changes nothing.

    reloader = PolicyReloader(pipeline, [rules_dir, ...], signatures_dir, data_dir)
    reloader.reload("SIGHUP")           # -> True (new policy in force) / False (old policy stays, alert written)
    await reloader.watch(5.0)           # polls *.yaml/*.yml/*.yar/*.yara mtimes; reloads when they changed

What a reload does, in order:
1. load_configuration() on the folders as they are now (the same code and the same `file:line` messages as at
   start). Rules from several folders are combined again, exactly as `imguard run` did at start.
2. On ConfigError (or an unreadable folder): nothing is swapped. The errors are logged and an alert
   (`event.action: policy_reload`, `event.outcome: failure`, `imguard.policy.errors: ["file:line: ..."]`) is
   written; the running policy stays in force until a good version of the files arrives.
3. On success: a new Inspector on the new signatures (same limits) and the new Policy are put on the Pipeline,
   one attribute assignment each, so a message or file decided from then on uses them; a call already running
   finishes with the objects it read (Pipeline reads `policy` once per call). Connections are not touched:
   sessions hold the Pipeline, not the policy. An event records the policy version old -> new (and the
   signatures version); every decision already carries the version that made it (`rule.version`).

4. When the signatures changed, the kept files are rescanned with them in a background thread at low priority
   (imguard/retrohunt.py): a file allowed then and blocked now raises a `retrohunt` alert naming who received it.

Reloads are serialised (a lock), so SIGHUP during a file-triggered reload waits for it. The watcher reloads a
change only once the files have stopped changing for one poll (an editor's half-written file is not loaded),
and a broken version is reported once, not at every poll.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from imguard import alerts

logger = logging.getLogger("imguard.reload")

WATCHED_SUFFIXES = (".yaml", ".yml", ".yar", ".yara", ".txt")    # .txt: hash lists (imguard/policy/hashlists.py)


def fingerprint(folders: Iterable[Path]) -> tuple:
    """(path, mtime_ns, size) of every watched file directly in `folders`: changes when a file is edited,
    added, removed or replaced (a rename over it included)."""
    entries = []
    for folder in folders:
        try:
            children = sorted(Path(folder).iterdir())
        except OSError:
            entries.append((str(folder), -1, -1))       # a missing folder is a state too
            continue
        for path in children:
            if path.suffix.lower() not in WATCHED_SUFFIXES:
                continue
            try:
                st = path.stat()
            except OSError:
                continue
            entries.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(entries)


class PolicyReloader:
    def __init__(self, pipeline, rules_dirs: Path | Iterable[Path], signatures_dir: Path, data_dir: Path,
                 record: Callable[[dict], Any] | None = None, signature_settings: Any = None):
        self.pipeline = pipeline
        self.rules_dirs = [Path(rules_dirs)] if isinstance(rules_dirs, (str, Path)) else [Path(d) for d in rules_dirs]
        self.signatures_dir = Path(signatures_dir)
        self.data_dir = Path(data_dir)
        self.signature_settings = signature_settings      # inspect.SignatureSettings, as at start
        self.record = record if record is not None else pipeline.record
        self._lock = threading.Lock()
        self._snapshot = self.fingerprint()
        self.reloads = 0            # successful reloads
        self.failures = 0           # refused reloads
        self.last_errors: list[str] = []
        self.hunts = None           # retrohunt.BackgroundHunts, made at the first signature change

    def fingerprint(self) -> tuple:
        # Files the loaded signatures include from subfolders (an index.yar's includes) are watched too.
        signatures = getattr(getattr(self.pipeline, "inspector", None), "signatures", None)
        top = self.signatures_dir.resolve()
        included = [Path(f) for f in getattr(signatures, "files", ()) if Path(f).parent != top]
        stats = []
        for path in included:
            try:
                st = path.stat()
                stats.append((str(path), st.st_mtime_ns, st.st_size))
            except OSError:
                stats.append((str(path), -1, -1))
        from imguard.policy.hashlists import HASHLIST_FOLDER, folders_of
        lists = [d / HASHLIST_FOLDER for d in self.rules_dirs] + \
            folders_of((), getattr(self.signature_settings, "hash_lists", ""))
        return fingerprint([*self.rules_dirs, self.signatures_dir, *lists]) + tuple(stats)

    def changed(self) -> bool:
        return self.fingerprint() != self._snapshot

    @property
    def policy_version(self) -> str:
        return str(getattr(self.pipeline.policy, "version", ""))

    def reload(self, reason: str = "reload") -> bool:
        """Load, validate and swap; False (and an alert) when the new configuration cannot be used."""
        from imguard.inspect import Inspector
        from imguard.runtime import ConfigError, load_configuration

        with self._lock:
            seen = self.fingerprint()
            old_version = self.policy_version
            old_signatures = str(getattr(getattr(self.pipeline.inspector, "signatures", None), "version", ""))
            try:
                loaded = load_configuration(self.rules_dirs, self.signatures_dir, self.data_dir / "cache",
                                            self.signature_settings)
                limits = getattr(self.pipeline.inspector, "limits", None)
                inspector = Inspector(loaded.signatures, limits) if limits is not None else Inspector(loaded.signatures)
            except ConfigError as e:
                errors = list(e.errors)
            except (OSError, ValueError) as e:
                errors = [f"{type(e).__name__}: {e}"]
            else:
                errors = []
            self._snapshot = seen           # a broken version is reported once; the next edit is tried again
            if errors:
                self.failures += 1
                self.last_errors = errors
                logger.error("reload (%s) refused, policy %s stays in force:\n  %s", reason, old_version,
                             "\n  ".join(errors))
                event = alerts.policy_reload_event(old_version, ok=False, errors=errors, source=reason)
                event["imguard"]["policy"]["in_force"] = old_version
                self._record(event)
                return False
            # One assignment: every check after it uses the new pair; one under way keeps the old pair.
            self.pipeline.swap(loaded.policy, inspector)
            self.reloads += 1
            self.last_errors = []
            new_version = self.policy_version
            new_signatures = str(getattr(loaded.signatures, "version", ""))
            logger.info("reload (%s): policy %s -> %s, signatures %s -> %s, %d rules", reason, old_version,
                        new_version, old_signatures, new_signatures, len(getattr(loaded.policy, "rules", [])))
            event = alerts.policy_reload_event(new_version, ok=True, source=reason,
                                               rules=len(getattr(loaded.policy, "rules", [])))
            event["imguard"]["policy"].update(previous_version=old_version, signatures_version=new_signatures,
                                              previous_signatures_version=old_signatures)
            self._record(event)
            if new_signatures != old_signatures:
                self._retrohunt(reason)
            return True

    def _retrohunt(self, reason: str) -> None:
        """New signatures: rescan the kept files in the background at low priority (imguard/retrohunt.py), when the
        pipeline keeps files and retrohunt_on_reload is on."""
        filestore = getattr(self.pipeline, "filestore", None)
        if filestore is None or getattr(self.pipeline, "archive", None) is None or \
                not filestore.settings.retrohunt_on_reload:
            return
        from imguard.retrohunt import BackgroundHunts
        if self.hunts is None:
            self.hunts = BackgroundHunts(self.pipeline, filestore.settings.retrohunt_window_days)
        self.hunts.start(f"signatures reloaded ({reason})")

    def _record(self, event: dict) -> None:
        try:
            self.record(event)
        except Exception:
            logger.exception("could not record the reload event")

    # --- triggers --------------------------------------------------------------------------------------

    async def reload_async(self, reason: str) -> bool:
        """reload() in a worker thread: compiling signatures must not stall the event loop (and its connections)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.reload, reason)

    def on_signal(self) -> None:
        """For loop.add_signal_handler(SIGHUP, ...): schedule a reload, return at once."""
        task = asyncio.get_running_loop().create_task(self.reload_async("SIGHUP"))
        self._tasks = getattr(self, "_tasks", set())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def watch(self, interval: float) -> None:
        """Poll the folders every `interval` seconds; reload once a change has settled. Runs until cancelled."""
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                if not self.changed():
                    continue
                first = self.fingerprint()
                await asyncio.sleep(min(1.0, interval))
                if self.fingerprint() != first:
                    continue                    # still being written: look again at the next poll
                await self.reload_async("files changed")
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("policy file watcher failed; it keeps watching")
