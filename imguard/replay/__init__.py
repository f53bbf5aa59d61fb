"""Offline replay of packet captures through imguard's sessions and policy (`imguard pcap`).

    pcapfile     Capture.open(path): pcap/pcapng frames -> TcpSegment, warnings instead of exceptions
    reassembly   Reassembler: TcpSegment -> StreamOpened / StreamData / StreamGap / StreamClosed
    replay       Replay(pipeline).run(capture) -> ReplaySummary
    summary      ReplaySummary: conversations, messages, transfers, anomalies; as text or JSON
    http         HttpUploadSession: HTTP uploads in a capture, as the gateway's HTTP addon decides them, and chat
                 API calls and WebSockets, handed to the gateway's chat carrier (imguard/chatapi.py)
    websocket    WsReader: RFC 6455 frames (masking, permessage-deflate) -> whole messages
    cli          add_pcap_arguments(parser), replay_main(args)

Nothing here imports mitmproxy: the replay runs the protocol sessions directly.
"""

from imguard.replay.pcapfile import Capture, CaptureError, CaptureLimits, CaptureWarning, Frame, TcpSegment
from imguard.replay.reassembly import (Connection, Reassembler, ReassemblySettings, StreamClosed, StreamData,
                                       StreamGap, StreamOpened)
from imguard.replay.replay import Replay, ReplaySettings
from imguard.replay.summary import ReplaySummary

__all__ = ["Capture", "CaptureError", "CaptureLimits", "CaptureWarning", "Connection", "Frame", "Reassembler",
           "ReassemblySettings", "Replay", "ReplaySettings", "ReplaySummary", "StreamClosed", "StreamData",
           "StreamGap", "StreamOpened", "TcpSegment"]
