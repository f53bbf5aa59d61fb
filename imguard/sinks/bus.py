"""The event bus: every event goes to the local JSON-lines file at once, and to each remote sink through
that sink's on-disk queue and delivery thread.

    bus.write(event)   dedup -> alerts.jsonl (O_APPEND, fsync for alerts) -> append to each sink's queue
                       (fsync for alerts) -> wake the delivery threads. Never waits for a sink.
    bus.write_message(text, ctx, decision)
                       write(alerts.message_event(...)), the same line; an allowed message is written
                       without building its event when there is no remote sink.
    bus.close()        stop the threads; what is still queued stays on disk for the next start.

A delivery thread takes the oldest record of its queue, hands it to its sink and moves the queue's
cursor only when the sink confirmed it. A sink that fails is retried with a doubling wait (half a
second up to `retry_max_seconds`); the records behind it wait in order. A record that may already have
reached the sink (a retry after an ambiguous failure, or a record found again after a restart that was
handed out before it) is sent with `imguard.possible_duplicate: true`.

An event that a sink cannot take for a reason retrying cannot fix (it refuses that event's content, the
event cannot be encoded for it: DeliveryError.permanent, or the same unexpected error POISON_ATTEMPTS times)
is moved to that sink's dead-letter file, DATA_DIR/dead-letter/<queue slot>.jsonl (0600), with a
`sink_dead_letter` alert, and delivery goes on with the next: one poison event never stops a feed.

Problems of the sinks themselves become events too (`imguard.sink`, see docs/events.md): a sink that
goes down (once per outage) and comes back, records dropped from a full queue (counted, at most one
event per sink every DROP_REPORT_SECONDS), damaged queue records skipped, a queue write refused by the
disk. They go to the local file and to the other sinks, never to the sink they are about.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from imguard import alerts
from imguard.model import ChatContext, Decision
from imguard.sinks.base import DeliveryError, Sink
from imguard.sinks.dedup import Deduplicator
from imguard.sinks.queue import DiskQueue, Problem, open_free_queue

log = logging.getLogger(__name__)

DROP_REPORT_SECONDS = 10.0
RETRY_MIN_SECONDS = 0.5
# An error that is not a DeliveryError (a bug, an encoding the sink did not foresee) for the same record this
# many times in a row: the record is taken for poison and dead-lettered rather than retried for ever.
POISON_ATTEMPTS = 3


def _is_alert(event: dict[str, Any]) -> bool:
    return event.get("event", {}).get("kind") == "alert"


class _Delivery:
    """One sink, its queue and the thread that drains the queue into the sink."""

    def __init__(self, bus: "EventBus", sink: Sink, queue: DiskQueue, retry_max: float):
        self.bus, self.sink, self.queue, self.retry_max = bus, sink, queue, retry_max
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.up = True
        self.delivered = 0
        self.failures = 0
        self.last_error = ""
        self._ambiguous_seq = -1          # the seq whose last attempt may have reached the sink
        self._unexpected_seq, self._unexpected_count = -1, 0     # unexpected errors of one record in a row
        self.dead_lettered = 0
        self._drops_unreported = 0
        self._last_drop_report = 0.0
        self.thread = threading.Thread(target=self._run, name=f"imguard-sink-{sink.name}", daemon=True)

    def _is_poison(self, seq: int, error: Exception) -> bool:
        """Whether retrying `seq` is pointless: the sink says so, or it failed unexpectedly again and again."""
        if isinstance(error, DeliveryError):
            self._unexpected_seq, self._unexpected_count = -1, 0
            return error.permanent
        if seq != self._unexpected_seq:
            self._unexpected_seq, self._unexpected_count = seq, 0
        self._unexpected_count += 1
        return self._unexpected_count >= POISON_ATTEMPTS

    def _run(self) -> None:
        wait = RETRY_MIN_SECONDS
        while not self.stopping.is_set():
            record = self.queue.peek()
            self.bus._report_problems(self)
            if record is None:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            try:
                # json, not orjson: orjson reads an integer beyond 64 bits as a float and refuses a lone
                # surrogate, both of which alerts.encode's json fallback may have written.
                event = json.loads(record.payload)
            except ValueError:
                self.queue.ack(record.seq)
                self.bus._sink_problem(self, "corrupt", f"record {record.seq} is not JSON; skipped")
                continue
            if record.possible_duplicate or record.seq == self._ambiguous_seq:
                event.setdefault("imguard", {})["possible_duplicate"] = True
            self.queue.mark_attempted(record.seq)
            try:
                self.sink.send(event)
            except Exception as e:   # noqa: BLE001 - a sink's bug must not kill delivery
                if self._is_poison(record.seq, e):
                    self.bus._dead_letter(self, record.seq, record.payload, e)
                    self.queue.ack(record.seq)
                    continue
                ambiguous = e.ambiguous if isinstance(e, DeliveryError) else True
                if ambiguous:
                    self._ambiguous_seq = record.seq
                self.failures += 1
                self.last_error = str(e)
                if self.up:
                    self.up = False
                    self.bus._sink_problem(self, "down", f"{self.sink.name}: {e}; events wait in its queue",
                                           backlog=self.queue.backlog_records)
                if self.stopping.wait(wait):
                    break
                wait = min(wait * 2, self.retry_max)
                continue
            self.queue.ack(record.seq)
            self.delivered += 1
            wait = RETRY_MIN_SECONDS
            if self.bus.metrics is not None:
                self.bus.metrics.queue_depth(self.sink.name, self.queue.backlog_records)
            if not self.up:
                self.up = True
                self.bus._sink_problem(self, "recovered", f"{self.sink.name} accepts events again; delivering "
                                       "the backlog in order", backlog=self.queue.backlog_records, severity="info")


class EventBus:
    """Drop-in for AlertLog (`write(event)`, `close()`), fanning out to the remote sinks."""

    def __init__(self, local: alerts.AlertLog | None, sinks: list[Sink] = (), queue_dir: Path | None = None,
                 queue_max_bytes: int = 64 * 1024 * 1024, dedup_window: float = 0.0, retry_max: float = 30.0,
                 metrics: Any = None, clock: Callable[[], float] = time.monotonic, start: bool = True,
                 dead_letter_dir: Path | None = None):
        self.local = local
        # DATA_DIR/dead-letter beside DATA_DIR/queue, unless given.
        self.dead_letter_dir = Path(dead_letter_dir) if dead_letter_dir is not None else (
            Path(queue_dir).parent / "dead-letter" if queue_dir is not None else None)
        self.metrics = metrics
        self.path = local.path if local is not None else None
        self.dedup = Deduplicator(dedup_window, clock=clock)
        self._deliveries: list[_Delivery] = []
        self._reporting = threading.local()
        self._drop_lock = threading.Lock()
        self._closed = False
        if sinks and queue_dir is None:
            raise ValueError("remote sinks need a queue directory")
        try:
            for sink in sinks:
                queue = open_free_queue(Path(queue_dir) / sink.name, queue_max_bytes)
                self._deliveries.append(_Delivery(self, sink, queue, retry_max))
        except BaseException:
            for delivery in self._deliveries:
                delivery.queue.close()
            raise
        for delivery in self._deliveries:
            self._report_problems(delivery)           # a torn tail found when the queue was opened
        self._ticker_stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="imguard-sink-dedup", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        for delivery in self._deliveries:
            if not delivery.thread.is_alive():
                delivery.thread.start()
        if self.dedup.window > 0 and not self._ticker.is_alive():
            self._ticker.start()

    @property
    def instance(self) -> str:
        return self.local.instance if self.local is not None else ""

    # --- writing ---------------------------------------------------------------------------------
    def write(self, event: dict[str, Any]) -> None:
        """Record one event: on disk locally before this returns, queued for every sink that wants it.
        Never blocks on a sink and never raises for a sink's or a queue's trouble."""
        if self.metrics is not None:
            self.metrics.observe_event(event)
        if not _is_alert(event):
            # Plain events are never suppressed (dedup_key is None for them): skip the filter. This is the
            # path of every allowed chat message.
            self._emit(event)
            return
        # Suppression spares the remote sinks (a SIEM, a mailbox) a flood of repeats; the local log is
        # the record, so it gets every event, repeats included.
        kept = self.dedup.filter(event)
        if kept is None:
            if self.metrics is not None:
                self.metrics.suppressed()
            self._emit(event, remote=False)
            return
        self._emit(kept)

    def write_message(self, text: str | None, ctx: ChatContext, decision: Decision) -> None:
        """write(alerts.message_event(text, ctx, decision)): the same line, the same counts. A plain message
        (alerts.is_plain_message) that no remote sink can take, there being none, is counted and handed to
        AlertLog.write_plain_message without building the event: the path of every allowed chat message."""
        local = self.local
        if self._deliveries or local is None or not alerts.is_plain_message(decision):
            # Sinks choose events by their content (sink.accepts), and they want the event itself.
            self.write(alerts.message_event(text, ctx, decision))
            return
        if self.metrics is not None:
            self.metrics.message(decision.action)        # what observe_event counts for a plain message
        try:
            local.write_plain_message(text, ctx, decision)
        except OSError as e:
            self._local_write_failed(e)

    def _local_write_failed(self, error: OSError) -> None:
        print(f"imguard: cannot write {self.local.path}: {error}", file=sys.stderr)
        if self.metrics is not None:
            self.metrics.anomaly("alert_log_write_failed")

    def _emit(self, event: dict[str, Any], skip: _Delivery | None = None, remote: bool = True,
              local: bool = True) -> None:
        # Without setdefault: its default would be built for every event, and an id spent for nothing.
        fields = event.get("event")
        if fields is None:
            fields = event["event"] = {}
        if "id" not in fields:
            fields["id"] = alerts.new_event_id()
        observer = event.get("observer")
        if observer is None:
            observer = event["observer"] = alerts.OBSERVER.copy()
        if self.local is not None:
            observer["name"] = self.local.instance
        # Queued first, then the local line: whatever the local log shows was queued for every sink,
        # even if the process dies between the two writes.
        if self._deliveries and remote:
            payload = alerts.encode(event)
            sync = _is_alert(event)
            for delivery in self._deliveries:
                if delivery is skip or not delivery.sink.accepts(event):
                    continue
                try:
                    delivery.queue.append(payload, sync=sync)
                except OSError as e:
                    delivery.queue.dropped += 1
                    self._sink_problem(delivery, "queue_write_failed",
                                       f"cannot queue an event for {delivery.sink.name}: {e}; it is in the local "
                                       "log only", count=1, severity="high")
                self._report_problems(delivery)
                if self.metrics is not None:
                    self.metrics.queue_depth(delivery.sink.name, delivery.queue.backlog_records)
                delivery.wake.set()
        if self.local is not None and local:
            try:
                self.local.write(event)
            except OSError as e:
                self._local_write_failed(e)

    # --- problems of the sinks -----------------------------------------------------------------
    def dead_letter_path(self, delivery: _Delivery) -> Path | None:
        if self.dead_letter_dir is None:
            return None
        return self.dead_letter_dir / f"{delivery.queue.directory.name}.jsonl"

    def _dead_letter(self, delivery: _Delivery, seq: int, payload: bytes, error: Exception) -> None:
        """Move a record the sink will never take to its dead-letter file, and say so (sink_dead_letter)."""
        delivery.dead_lettered += 1
        reason = f"{type(error).__name__}: {error}" if not isinstance(error, DeliveryError) else str(error)
        try:
            event_id = str(json.loads(payload).get("event", {}).get("id", ""))
        except (ValueError, AttributeError):
            event_id = ""
        path = self.dead_letter_path(delivery)
        where = "kept nowhere else but the local log"
        if path is not None:
            meta = {"@timestamp": alerts.utc_now(), "sink": delivery.sink.name, "reason": reason, "queue_seq": seq}
            # The queued bytes as they are: the event exactly as it would have gone to the sink.
            line = alerts.encode(meta)[:-2] + b',"event":' + payload.rstrip(b"\n") + b"}\n"
            try:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.fchmod(fd, 0o600)
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                where = f"moved to {path}"
            except OSError as e:
                where = f"not written to {path} ({e}); it is in the local log"
        self._sink_problem(delivery, "dead_letter",
                           f"{delivery.sink.name} cannot take event {event_id or seq} ({reason}): {where}; "
                           "delivery goes on with the next event", severity="high", event_id=event_id,
                           reason=reason[:500], path=str(path) if path is not None else "")

    def _report_problems(self, delivery: _Delivery) -> None:
        for problem in delivery.queue.take_problems():
            self._queue_problem(delivery, problem)
        if delivery._drops_unreported and time.monotonic() - delivery._last_drop_report >= DROP_REPORT_SECONDS:
            self._flush_drops(delivery)

    def _queue_problem(self, delivery: _Delivery, problem: Problem) -> None:
        if problem.kind == "dropped":
            with self._drop_lock:
                delivery._drops_unreported += problem.count
                due = time.monotonic() - delivery._last_drop_report >= DROP_REPORT_SECONDS
            if due:
                self._flush_drops(delivery)
            return
        self._sink_problem(delivery, f"queue_{problem.kind}", problem.detail, count=problem.count)

    def _flush_drops(self, delivery: _Delivery) -> None:
        with self._drop_lock:
            count, delivery._drops_unreported = delivery._drops_unreported, 0
            delivery._last_drop_report = time.monotonic()
        if count:
            self._sink_problem(delivery, "queue_full",
                               f"the queue of {delivery.sink.name} is full: {count} of its oldest undelivered "
                               "events were dropped (they remain in the local log)", count=count,
                               dropped_total=delivery.queue.dropped, severity="high")

    def _sink_problem(self, delivery: _Delivery, kind: str, detail: str, severity: str = "medium",
                      **data: Any) -> None:
        if self.metrics is not None:
            self.metrics.anomaly(f"sink_{kind}")
        log.warning("%s", detail)
        event = alerts.sink_failure_event(delivery.sink.name, kind, detail, severity=severity, **data)
        if kind == "recovered":
            event["event"]["kind"] = "event"
            event["event"]["outcome"] = "success"
        if getattr(self._reporting, "active", False):
            # A problem found while reporting a problem: the local log only, no loops between sinks.
            if self.local is not None:
                try:
                    self.local.write(event)
                except OSError:
                    pass
            return
        self._reporting.active = True
        try:
            self._emit(event, skip=delivery)
        finally:
            self._reporting.active = False

    # --- dedup summaries, shutdown -------------------------------------------------------------------
    def _tick_loop(self) -> None:
        while not self._ticker_stop.wait(1.0):
            self.tick()

    def tick(self) -> None:
        """Send the summaries of dedup windows that have passed, and pending drop counts."""
        for summary in self.dedup.expire():
            self._emit(summary, local=False)     # the local log already has every suppressed event
        for delivery in self._deliveries:
            if delivery._drops_unreported and time.monotonic() - delivery._last_drop_report >= DROP_REPORT_SECONDS:
                self._flush_drops(delivery)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per sink: up, backlog (records and bytes), delivered, dropped, failures, dead-lettered, last error."""
        return {d.sink.name: {"up": d.up, "backlog": d.queue.backlog_records, "backlog_bytes": d.queue.backlog_bytes,
                              "delivered": d.delivered, "dropped": d.queue.dropped, "failures": d.failures,
                              "dead_lettered": d.dead_lettered,
                              "last_error": d.last_error} for d in self._deliveries}

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every queue is empty (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(d.queue.peek() is None for d in self._deliveries):
                return True
            for d in self._deliveries:
                d.wake.set()
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 5.0) -> None:
        """Stop delivering; undelivered events stay queued on disk for the next start."""
        if self._closed:
            return
        self._closed = True
        for summary in self.dedup.expire(flush_all=True):
            self._emit(summary, local=False)
        for delivery in self._deliveries:
            self._flush_drops(delivery)
        self._ticker_stop.set()
        for delivery in self._deliveries:
            delivery.stopping.set()
            delivery.wake.set()
        deadline = time.monotonic() + timeout
        for delivery in self._deliveries:
            if delivery.thread.is_alive():
                delivery.thread.join(max(0.0, deadline - time.monotonic()))
        for delivery in self._deliveries:
            if not delivery.thread.is_alive():
                delivery.sink.close()
                delivery.queue.close()
        if self.local is not None:
            self.local.close()
