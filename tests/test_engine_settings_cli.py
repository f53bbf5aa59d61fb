"""A bad external-engine setting (imguard/inspect/icap.py, clamav.py: check_settings) is refused at startup by the
command line itself, in one line naming the setting and its value, exit code 2, as other bad settings are: never a
Python traceback, never a gateway that starts and fails on the first file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BAD = [
    (["--icap-url", "icap://127.0.0.1:1344/avscan", "--icap-method", "OPTIONS"], "icap_method", "'OPTIONS'"),
    (["--icap-method", "respmodd"], "icap_method", "'respmodd'"),
    (["--icap-url", "http://127.0.0.1:1344/avscan"], "icap_url", "'http://127.0.0.1:1344/avscan'"),
    (["--icap-url", "icap://127.0.0.1:99999/avscan"], "icap_url", "'icap://127.0.0.1:99999/avscan'"),
    (["--icap-url", "icap://127.0.0.1:port/avscan"], "icap_url", "'icap://127.0.0.1:port/avscan'"),
    (["--icap-url", "icap://[::1/avscan"], "icap_url", "'icap://[::1/avscan'"),
    (["--icap-url", "icap:///avscan"], "icap_url", "'icap:///avscan'"),
    (["--icap-timeout", "0"], "icap_timeout", "0.0"),
    (["--icap-max-size", "-1"], "icap_max_size", "-1"),
    (["--clamd-address", "localhost"], "clamd_address", "'localhost'"),
    (["--clamd-address", "localhost:clamd"], "clamd_address", "'localhost:clamd'"),
    (["--clamd-address", "127.0.0.1:70000"], "clamd_address", "'127.0.0.1:70000'"),
    (["--clamd-address", "unix:"], "clamd_address", "'unix:'"),
    (["--clamd-timeout", "-5"], "clamd_timeout", "-5.0"),
]


def imguard(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imguard", *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture
def sample(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("minutes of the meeting\n")
    return path


@pytest.mark.parametrize("options, name, value", BAD, ids=[" ".join(o) for o, _, _ in BAD])
def test_scan_refuses_a_bad_engine_setting_in_one_line(tmp_path, sample, options, name, value):
    """`imguard scan` with the bad setting: exit 2, one line on stderr that names the setting and the value it was
    given (`value`: as the line shows it), nothing scanned (stdout empty)."""
    result = imguard("scan", "--data-dir", str(tmp_path / "data"), *options, str(sample))
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == "", result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"{name}: ") and value in line, line


def test_good_engine_settings_are_taken(tmp_path, sample):
    """The other side: well-formed settings start the scan (nobody listens there, so the engines give no verdict and
    the file is blocked as unscannable, exit 1: the settings were used, not refused)."""
    result = imguard("scan", "--data-dir", str(tmp_path / "data"), "--icap-url", "icap://127.0.0.1:9/avscan",
                     "--icap-method", "REQMOD", "--icap-timeout", "2", "--clamd-address", str(tmp_path / "no.ctl"),
                     str(sample))
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "icap gave no verdict" in result.stderr and "clamav gave no verdict" in result.stderr, result.stderr


@pytest.mark.parametrize("how", ["option", "config-file"])
def test_run_refuses_a_bad_engine_setting_before_it_listens(tmp_path, how):
    """`imguard run` (the gateway), the setting given as an option or in its --config file: exit 2 with the setting
    and the value named, before any listener starts (its port stays free)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["run", "--listen-host", "127.0.0.1", "--mode", f"socks5@127.0.0.1:{port}",
            "--data-dir", str(tmp_path / "data")]
    if how == "option":
        argv += ["--clamd-address", "clamd.example:port"]
    else:
        config = tmp_path / "imguard.yaml"
        config.write_text("clamd-address: 'clamd.example:port'\n")
        argv += ["--config", str(config)]
    result = imguard(*argv)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert "clamd_address: 'clamd.example:port'" in result.stderr, result.stderr
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))         # nothing listened there
