"""`imguard pcap FILE...`: replay captures through the sessions and the policy, offline.

    imguard pcap chat.pcap other.pcapng [--rules DIR] [--signatures DIR] [--json] [--out DIR]

Prints, per capture, its connections by protocol, the chat messages with the action policy took,
the file transfers with size, SHA-256, true type, verdict and rules, and the anomalies (capture
damage, gaps, protocol weirds). With --json: one JSON object per capture on one line.

--out DIR keeps the evidence: DIR/files/<2 hex>/<sha256> (each extracted file, content-addressed as
Suricata's filestore: a name from the wire is never a path), DIR/alerts.jsonl (every decision, as the
gateway writes them, but stamped with the capture's time; event.created is when it was written) and
DIR/summary.jsonl (the JSON summaries). Without --out nothing is written:
an offline replay does not add to the gateway's own alert log.

Exit codes: 0 nothing blocked, 1 a message or file would have been blocked, 2 usage or configuration
error or a file that is not a capture.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from imguard import settings
from imguard.replay.pcapfile import Capture, CaptureError, CaptureLimits
from imguard.replay.reassembly import ReassemblySettings
from imguard.replay.replay import Replay, ReplaySettings, limits_classes
from imguard.replay.summary import Transfer

EXIT_OK, EXIT_BLOCKED, EXIT_USAGE = 0, 1, 2


def add_pcap_arguments(parser: argparse.ArgumentParser) -> None:
    from imguard.runtime import add_config_arguments

    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="pcap or pcapng capture files")
    add_config_arguments(parser, "data folder for the compiled-signature cache")
    parser.add_argument("--json", action="store_true", help="one JSON summary per capture, one per line")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="write extracted files (DIR/files/<2 hex>/<sha256>), alerts.jsonl and summary.jsonl")
    settings.add_arguments(parser, ReplaySettings, "replay")
    settings.add_arguments(parser, ReassemblySettings, "TCP reassembly")
    settings.add_arguments(parser, CaptureLimits, "capture reading")
    from imguard.inspect import InspectLimits
    settings.add_arguments(parser, InspectLimits, "inspection limits")
    for key, cls, title in limits_classes():        # the gateway's per-protocol options, and HTTP uploads'
        settings.add_arguments(parser, cls, title, prefix=settings.option_prefix(key, cls))


class FileStore:
    """Extracted files, content-addressed: ROOT/<first two hex digits>/<sha256>. Written once, read-only."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def save(self, data: bytes, sha256: str) -> Path:
        folder = self.root / sha256[:2]
        path = folder / sha256
        if path.exists():
            return path
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{sha256}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)   # it may be malware: not executable
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return path


PROGRESS_MIN_BYTES = 16 * 1024 * 1024


def _with_progress(capture: Capture):
    """The capture's TCP segments and UDP datagrams, with a progress bar on stderr when it is a terminal and the
    capture large."""
    segments = capture.packets()
    total = capture.stats.bytes
    if total < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        yield from segments
        return
    width = 30
    for n, segment in enumerate(segments):
        if n % 4096 == 0:
            done = capture.position / total
            sys.stderr.write(f"\r{capture.name}: [{'#' * int(width * done):{width}}] {done:4.0%}")
            sys.stderr.flush()
        yield segment
    sys.stderr.write("\r" + " " * (len(capture.name) + width + 10) + "\r")
    sys.stderr.flush()


def replay_main(args: argparse.Namespace) -> int:
    from imguard.alerts import AlertLog, capture_time
    from imguard.runtime import ConfigError, build_pipeline, default_data_dir

    try:
        replay_settings = settings.from_arguments(ReplaySettings, args)   # --ports given: replaces the map
        reassembly = settings.from_arguments(ReassemblySettings, args)
        limits = settings.from_arguments(CaptureLimits, args)
        session_limits = [settings.from_arguments(cls, args, prefix=settings.option_prefix(key, cls))
                          for key, cls, _ in limits_classes()]
        from imguard.inspect import InspectLimits
        pipeline = build_pipeline(args.rules, args.signatures, args.data_dir or default_data_dir(),
                                  limits=settings.from_arguments(InspectLimits, args), write_alerts=False)
    except ConfigError as e:
        for error in e.errors:
            print(f"imguard: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:
        print(f"imguard: {e}", file=sys.stderr)
        return EXIT_USAGE

    store = summary_out = current = None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        pipeline.alert_log = AlertLog(args.out / "alerts.jsonl")
        store = FileStore(args.out / "files")
        summary_out = open(args.out / "summary.jsonl", "a", encoding="utf-8")

    def keep(data: bytes, transfer: Transfer) -> None:
        if store is not None and data:
            path = store.save(data, transfer.sha256)
            transfer.stored = str(path.relative_to(args.out))

    status = EXIT_OK
    try:
        for path in args.files:
            try:
                capture = Capture.open(path, limits)
            except (CaptureError, OSError) as e:
                print(f"imguard: {e if isinstance(e, CaptureError) else f'{path}: {e.strerror}'}", file=sys.stderr)
                status = EXIT_USAGE
                continue
            try:
                current = Replay(pipeline, replay_settings, reassembly, on_file=keep, limits=session_limits)
                with capture_time(lambda replay=current: replay.now):     # events carry the capture's time
                    summary = current.run_segments(capture, _with_progress(capture))
            except ValueError as e:     # a bad port map
                print(f"imguard: {e}", file=sys.stderr)
                return EXIT_USAGE
            if summary.blocked and status == EXIT_OK:
                status = EXIT_BLOCKED
            line = json.dumps(summary.to_dict(), default=str)
            if summary_out is not None:
                summary_out.write(line + "\n")
            print(line if args.json else summary.format_text(), flush=True)
    finally:
        if summary_out is not None:
            summary_out.close()
        if pipeline.alert_log is not None:
            pipeline.alert_log.close()
    return status


def main(argv: list[str] | None = None) -> int:
    """`python -m imguard.replay.cli FILE...` until the lead wires `imguard pcap` into imguard.cli."""
    parser = argparse.ArgumentParser(prog="imguard pcap", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pcap_arguments(parser)
    return replay_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
