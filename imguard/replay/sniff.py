"""`imguard sniff IFACE`: passive monitoring of a SPAN port or a tap, through the same pipeline as `imguard pcap`.

Packets come from tcpdump (`tcpdump -i IFACE -U -w - FILTER`): it owns the capture socket and compiles the
BPF filter, and writes pcap records to a pipe the moment they arrive (-U), which this module reads record by
record and hands to the replay's decoder, reassembly and sessions. Nothing is forwarded or blocked: a tap
sees copies, so every decision is an alert, written where the gateway writes them (DATA_DIR/alerts.jsonl and
the configured sinks). The summary of what was seen is printed when sniffing stops (SIGINT, SIGTERM, or
`--seconds`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import struct
import subprocess
import sys
import threading
from typing import BinaryIO, Iterator

from imguard import settings
from imguard.replay.pcapfile import PCAP_MAGICS, Capture, CaptureLimits, Frame
from imguard.replay.reassembly import ReassemblySettings
from imguard.replay.replay import Replay, ReplaySettings, limits_classes

EXIT_OK, EXIT_ALERTS, EXIT_USAGE = 0, 1, 2


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    chunks, missing = [], n
    while missing:
        chunk = stream.read(missing)
        if not chunk:
            break
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


class PcapStream:
    """pcap records read from a pipe as they arrive (the file format, without seeking)."""

    def __init__(self, stream: BinaryIO, limits: CaptureLimits):
        self.stream = stream
        self.limits = limits
        self.header = _read_exactly(stream, 24)
        if len(self.header) < 24:
            raise ValueError("the capture process wrote no pcap header")
        magic = struct.unpack_from("<I", self.header)[0]
        if magic not in PCAP_MAGICS:
            raise ValueError(f"the capture process wrote no pcap header (magic {magic:#010x})")
        order, self.divisor, _ = PCAP_MAGICS[magic]
        self.record = struct.Struct(order + "IIII")
        self.linktype = struct.unpack_from(order + "I", self.header, 20)[0] & 0xFFFF

    def frames(self) -> Iterator[Frame]:
        number = 0
        while True:
            head = _read_exactly(self.stream, self.record.size)
            if len(head) < self.record.size:
                return
            ts_sec, ts_frac, caplen, origlen = self.record.unpack(head)
            if caplen > self.limits.max_record_bytes:
                raise ValueError(f"record length {caplen} from the capture process is absurd")
            data = _read_exactly(self.stream, caplen)
            if len(data) < caplen:
                return
            number += 1
            yield Frame(number, ts_sec + ts_frac / self.divisor, self.linktype, data, origlen)


def add_sniff_arguments(parser: argparse.ArgumentParser) -> None:
    from imguard.runtime import add_config_arguments

    parser.add_argument("interface", metavar="IFACE", help="the interface of the SPAN port or tap (e.g. eth1)")
    parser.add_argument("--filter", default="tcp", metavar="BPF",
                        help="a BPF capture filter, as for tcpdump (default: 'tcp'); e.g. 'tcp port 5222 or "
                             "tcp port 6667'. DCC and other side connections use ports announced in the chat, "
                             "so a narrow port filter misses them; SIP over UDP needs e.g. 'tcp or udp port 5060'")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this many seconds (0: run until "
                        "SIGINT or SIGTERM)")
    add_config_arguments(parser, "where alerts, the archive and the quarantine go")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    settings.add_arguments(parser, ReplaySettings, "replay")
    settings.add_arguments(parser, ReassemblySettings, "TCP reassembly")
    settings.add_arguments(parser, CaptureLimits, "capture reading")
    for key, cls, title in limits_classes():        # the gateway's per-protocol options, and HTTP uploads'
        settings.add_arguments(parser, cls, title, prefix=settings.option_prefix(key, cls))


def sniff_main(args: argparse.Namespace) -> int:
    from imguard.inspect import InspectLimits
    from imguard.runtime import ConfigError, build_pipeline, default_data_dir

    tcpdump = shutil.which("tcpdump") or shutil.which("tcpdump", path="/usr/sbin:/usr/bin:/sbin")
    if tcpdump is None:
        print("imguard: `imguard sniff` reads packets with tcpdump, which is not installed "
              "(Debian: apt-get install tcpdump)", file=sys.stderr)
        return EXIT_USAGE
    try:
        replay_settings = settings.from_arguments(ReplaySettings, args)
        reassembly = settings.from_arguments(ReassemblySettings, args)
        limits = settings.from_arguments(CaptureLimits, args)
        session_limits = [settings.from_arguments(cls, args, prefix=settings.option_prefix(key, cls))
                          for key, cls, _ in limits_classes()]
        pipeline = build_pipeline(args.rules, args.signatures, args.data_dir or default_data_dir(),
                                  limits=InspectLimits())
    except ConfigError as e:
        for error in e.errors:
            print(error, file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:
        print(f"imguard: {e}", file=sys.stderr)
        return EXIT_USAGE

    command = [tcpdump, "-i", args.interface, "-U", "-n", "-s", "0", "-w", "-"]
    if args.filter:
        command.append(args.filter)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def stop(*_):
        if process.poll() is None:
            process.terminate()         # its end of the pipe closes: the loop below sees EOF and finishes

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    timer = threading.Timer(args.seconds, stop) if args.seconds > 0 else None
    try:
        try:
            stream = PcapStream(process.stdout, limits)
        except ValueError as e:
            process.wait(10)
            reason = process.stderr.read().decode(errors="replace").strip() or e
            print(f"imguard: cannot capture on {args.interface}: {reason}", file=sys.stderr)
            return EXIT_USAGE
        if timer is not None:
            timer.start()
        print(f"imguard: sniffing on {args.interface} (filter {args.filter!r}); alerts go to "
              f"{getattr(pipeline.alert_log, 'path', '?')}", file=sys.stderr, flush=True)
        capture = Capture(stream.header, name=f"sniff:{args.interface}", limits=limits)
        capture.udp = True          # UDP datagrams too (SIP over UDP), as `imguard pcap` replays them
        replay = Replay(pipeline, replay_settings, reassembly, limits=session_limits)
        summary = replay.run_segments(capture, (seg for frame in stream.frames()
                                                if (seg := capture.decode_tcp(frame)) is not None))
    finally:
        if timer is not None:
            timer.cancel()
        stop()
        process.wait(10)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        pipeline.close()
    print(json.dumps(summary.to_dict(), default=str) if args.json else summary.format_text(), flush=True)
    return EXIT_ALERTS if summary.blocked else EXIT_OK
