"""systemd readiness (imguard/gateway/sdnotify.py): a real unix datagram socket stands in for systemd's
$NOTIFY_SOCKET, and a real `imguard run` must say READY=1 only once its listener accepts, and STOPPING=1 when it is
told to stop."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from imguard.gateway import sdnotify
from tests.peers.prosody import free_ports, stop_process


@pytest.fixture
def notify_socket():
    """A bound unix datagram socket, as systemd opens for a Type=notify unit (a short path: sun_path is 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="imguard-notify-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)
    yield sock, path
    sock.close()
    os.unlink(path)
    os.rmdir(directory)


def test_nothing_is_sent_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready("x") is False and sdnotify.stopping() is False


def test_ready_and_stopping_datagrams(monkeypatch, notify_socket):
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.ready("3 listeners bound")
    assert sock.recv(4096) == b"READY=1\nSTATUS=3 listeners bound"
    assert sdnotify.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_socket(monkeypatch):
    name = f"imguard-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert sock.recv(4096) == b"READY=1"


def test_a_missing_socket_is_logged_not_raised(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="imguard.gateway"):
        assert sdnotify.ready() is False
    assert "cannot notify systemd" in caplog.text


def test_journal_logging_only_when_stderr_is_the_journal_stream(monkeypatch, tmp_path):
    """$JOURNAL_STREAM names stderr: lines get syslog priorities and no timestamp; naming another file: unchanged."""
    stream = open(tmp_path / "stderr", "w")
    stat = os.fstat(stream.fileno())
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino + 1}")
    assert not sdnotify.stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
    assert sdnotify.stderr_is_journal()
    record = logging.LogRecord("imguard.gateway", logging.WARNING, __file__, 1, "two\nlines", None, None)
    assert sdnotify.JournalFormatter().format(record) == "<4>WARNING imguard.gateway: two\n<4>lines"
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    assert sdnotify.JournalFormatter().format(record).startswith("<7>DEBUG")
    stream.close()


def test_imguard_run_is_ready_once_it_listens_and_says_when_it_stops(tmp_path, notify_socket):
    """READY=1 arrives only when the listener already accepts connections (checked at that moment, independently
    of imguard's own output), and SIGTERM brings STOPPING=1 before a clean exit."""
    sock, path = notify_socket
    port = free_ports(1)[0]
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "imguard", "run", "--mode", f"regular@127.0.0.1:{port}",
                             "--data-dir", str(tmp_path / "data")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "NOTIFY_SOCKET": path})
    log.close()
    try:
        message = sock.recv(4096).decode()
        assert message.splitlines()[0] == "READY=1", message
        assert "STATUS=" in message
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass                                    # bound and accepting when READY=1 was sent
        assert proc.poll() is None
        os.killpg(proc.pid, 15)
        assert sock.recv(4096) == b"STOPPING=1"
        assert proc.wait(15) == 0
    finally:
        stop_process(proc)
        if proc.returncode not in (0, None):
            print(Path(tmp_path / "run.log").read_text())


def test_imguard_run_that_cannot_listen_never_says_ready(tmp_path, notify_socket):
    """A port already taken: `imguard run` exits 2 and sends no READY=1 (systemd then fails the start)."""
    sock, path = notify_socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "imguard", "run", "--mode", f"regular@127.0.0.1:{port}",
                                 "--data-dir", str(tmp_path / "data")], capture_output=True, timeout=120,
                                env={**os.environ, "NOTIFY_SOCKET": path})
    assert result.returncode == 2, result.stderr
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        sock.recv(4096)
