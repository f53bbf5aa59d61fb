"""`imguard pcap` shows a progress bar on a terminal for a large capture, and none in a pipe."""

import io

from imguard.replay import cli
from imguard.replay.pcapfile import Capture
from tests.test_replay_builders import stream_capture


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal_and_only_for_large_captures(monkeypatch):
    data = stream_capture([(True, b"NICK alice\r\n"), (False, b":srv 001 alice :hi\r\n")] * 50, port=6667)
    monkeypatch.setattr(cli, "PROGRESS_MIN_BYTES", 1)
    terminal = Terminal()
    monkeypatch.setattr(cli.sys, "stderr", terminal)
    segments = list(cli._with_progress(Capture(data, name="c.pcap")))
    assert "c.pcap: [" in terminal.getvalue() and "%" in terminal.getvalue()

    pipe = io.StringIO()
    monkeypatch.setattr(cli.sys, "stderr", pipe)
    assert len(list(cli._with_progress(Capture(data, name="c.pcap")))) == len(segments) > 0
    assert pipe.getvalue() == ""
