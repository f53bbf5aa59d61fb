"""Metrics for Prometheus: counters, gauges and one histogram, served as text on /metrics.

    metrics = Metrics()
    metrics.connection_opened("xmpp"); metrics.message("block", ["no-secrets"])
    metrics.file("allow", [], size=1234, seconds=0.012); metrics.anomaly("malformed_xml")
    metrics.tls_failure(); metrics.queue_depth("webhook", 17)
    server = serve(metrics, "127.0.0.1:9108")      # a daemon thread; server.close() stops it

Only the standard library: the exposition format (text 0.0.4) is a few lines, and the gateway should
not grow a dependency for it. Every method is thread-safe (one lock, held for a dict update). The
endpoint is off unless `metrics_listen` is set, and a bare port listens on loopback only: counts of
people's messages are not for the whole network.
"""

from __future__ import annotations

import bisect
import dataclasses
import http.server
import socket
import threading
from typing import Iterable

from imguard.settings import setting

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1024, 16 * 1024, 256 * 1024, 1024 ** 2, 16 * 1024 ** 2, 256 * 1024 ** 2, 1024 ** 3)

_HELP = {
    "imguard_connections_total": ("counter", "Client connections, by chat protocol."),
    "imguard_messages_total": ("counter", "Chat messages decided, by action."),
    "imguard_files_total": ("counter", "Files inspected and decided, by action."),
    "imguard_file_bytes_total": ("counter", "Bytes of files inspected."),
    "imguard_decisions_total": ("counter", "Rule matches that made a decision, by kind (message or file), "
                                           "action and rule (rule=\"\" when no rule matched)."),
    "imguard_anomalies_total": ("counter", "Protocol and sink anomalies, by kind."),
    "imguard_tls_failures_total": ("counter", "TLS interceptions that failed."),
    "imguard_alerts_suppressed_total": ("counter", "Repeated identical alerts suppressed by the dedup window."),
    "imguard_queue_depth": ("gauge", "Events waiting in a sink's on-disk queue."),
    "imguard_inspection_seconds": ("histogram", "Time to inspect one file (type, hashes, archives, YARA)."),
    "imguard_file_size_bytes": ("histogram", "Size of inspected files."),
}


@dataclasses.dataclass(frozen=True)
class MetricsSettings:
    """metrics"""

    metrics_listen: str = setting("", "Serve Prometheus metrics on http://HOST:PORT/metrics ('' = off; a bare "
                                      "PORT listens on 127.0.0.1 only).")


def parse_listen(value: str) -> tuple[str, int]:
    """("127.0.0.1", 9108) from "9108", "127.0.0.1:9108", "[::1]:9108". Raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics_listen {value!r}: HOST:PORT or PORT expected")
    return host, int(port)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = {}
        self._gauges: dict[tuple[str, tuple], float] = {}
        self._histograms = {"imguard_inspection_seconds": _Histogram(LATENCY_BUCKETS),
                            "imguard_file_size_bytes": _Histogram(SIZE_BUCKETS)}
        # action -> the two counter keys of a message that matched no rule (the bulk of the traffic), made
        # once per action rather than per message. Actions are a handful of words.
        self._plain_message_keys: dict[str, tuple[tuple, tuple]] = {}

    def _inc(self, name: str, labels: tuple[tuple[str, str], ...] = (), value: float = 1) -> None:
        self._counters[(name, labels)] = self._counters.get((name, labels), 0) + value

    # --- what the gateway and the pipeline call -------------------------------------------------------
    def connection_opened(self, protocol: str) -> None:
        with self._lock:
            self._inc("imguard_connections_total", (("protocol", protocol or "unknown"),))

    def message(self, action: str, rules: Iterable[str] = ()) -> None:
        if not rules:
            self._plain_message(action)
            return
        with self._lock:
            self._inc("imguard_messages_total", (("action", action),))
            self._decisions("message", action, rules)

    def file(self, action: str, rules: Iterable[str] = (), size: int = 0, seconds: float | None = None) -> None:
        with self._lock:
            self._inc("imguard_files_total", (("action", action),))
            self._inc("imguard_file_bytes_total", (), size)
            self._decisions("file", action, rules)
            self._histograms["imguard_file_size_bytes"].observe(size)
            if seconds is not None:
                self._histograms["imguard_inspection_seconds"].observe(seconds)

    def _plain_message(self, action: str) -> None:
        """message(action) with no rule (rule=""): the counter keys made once per action, not per message."""
        keys = self._plain_message_keys.get(action)
        if keys is None:
            keys = self._plain_message_keys[action] = (
                ("imguard_messages_total", (("action", action),)),
                ("imguard_decisions_total", (("kind", "message"), ("action", action), ("rule", ""))))
        counters = self._counters
        with self._lock:
            for key in keys:
                counters[key] = counters.get(key, 0) + 1

    def _decisions(self, kind: str, action: str, rules: Iterable[str]) -> None:
        rules = list(rules) or [""]
        for rule in rules:
            self._inc("imguard_decisions_total", (("kind", kind), ("action", action), ("rule", rule)))

    def anomaly(self, kind: str) -> None:
        with self._lock:
            self._inc("imguard_anomalies_total", (("kind", kind),))

    def tls_failure(self) -> None:
        with self._lock:
            self._inc("imguard_tls_failures_total")

    def suppressed(self) -> None:
        with self._lock:
            self._inc("imguard_alerts_suppressed_total")

    def queue_depth(self, name: str, n: int) -> None:
        with self._lock:
            self._gauges[("imguard_queue_depth", (("sink", name),))] = n

    def observe_event(self, event: dict) -> None:
        """Count one event as written by the event bus: a message or file decision (with `event.duration`,
        ECS nanoseconds, as the inspection time when present), an anomaly or a TLS failure. The bus calls
        this for every event, so the pipeline need not call message()/file()/anomaly() itself."""
        ev = event.get("event", {})
        dataset = ev.get("dataset", "")
        rule = event.get("rule")
        rules = rule.get("id", ()) if rule else ()
        action = ev.get("action", "")
        if dataset == "imguard.message" and not rules:      # an allowed message: the bulk of the events
            self._plain_message(action)
            return
        rules = [rules] if isinstance(rules, str) else list(rules)
        if dataset == "imguard.message":
            self.message(action, rules)
        elif dataset == "imguard.file" and "decision" in event.get("imguard", {}) \
                and "notify" not in event["imguard"]:     # a notice about a decided file is not a second decision
            duration = ev.get("duration")
            self.file(action, rules, int(event.get("file", {}).get("size") or 0),
                      duration / 1e9 if isinstance(duration, (int, float)) else None)
        elif dataset == "imguard.anomaly":
            self.anomaly(str(event.get("imguard", {}).get("anomaly", {}).get("kind", "")))
        elif dataset == "imguard.tls":
            self.tls_failure()

    # --- exposition ---------------------------------------------------------------------------------
    def value(self, name: str, **labels: str) -> float:
        """A counter's or gauge's current value (0 when never set): for tests and status output."""
        key = (name, tuple(labels.items()))
        with self._lock:
            return self._counters.get(key, self._gauges.get(key, 0))

    def render(self) -> str:
        """The Prometheus text exposition format, version 0.0.4."""
        with self._lock:
            series: dict[str, list[str]] = {name: [] for name in _HELP}
            for (name, labels), value in sorted(self._counters.items()):
                series[name].append(f"{name}{_labels(labels)} {value:g}")
            for (name, labels), value in sorted(self._gauges.items()):
                series[name].append(f"{name}{_labels(labels)} {value:g}")
            for name, hist in self._histograms.items():
                cumulative = 0
                for bound, count in zip(hist.buckets, hist.counts, strict=False):   # counts[-1] is +Inf, below
                    cumulative += count
                    series[name].append(f'{name}_bucket{{le="{bound:g}"}} {cumulative}')
                series[name].append(f'{name}_bucket{{le="+Inf"}} {hist.count}')
                series[name].append(f"{name}_sum {hist.sum:g}")
                series[name].append(f"{name}_count {hist.count}")
        out = []
        for name, (kind, help_text) in _HELP.items():
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(series[name])
        return "\n".join(out) + "\n"


class MetricsServer:
    """/metrics over HTTP in a daemon thread. `address` is the (host, port) actually bound."""

    def __init__(self, metrics: Metrics, host: str = "127.0.0.1", port: int = 9108):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):   # noqa: N802 - http.server's naming
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = metrics.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server_class = http.server.ThreadingHTTPServer
        if ":" in host:
            server_class = type("V6Server", (http.server.ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        self._server = server_class((host, port), Handler)
        self._server.daemon_threads = True
        self.address = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="imguard-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve(metrics: Metrics, listen: str) -> MetricsServer | None:
    """Start the endpoint for a `metrics_listen` value; None when it is ''. Raises ValueError or OSError."""
    if not listen:
        return None
    host, port = parse_listen(listen)
    return MetricsServer(metrics, host, port)
