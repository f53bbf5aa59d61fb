"""`imguard run` and `imguard ca` as a user runs them: real subprocesses, the bundled rules and signatures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from test_gateway import free_port

ROOT = Path(__file__).resolve().parent.parent


def imguard(*args, data_dir: Path, **kw):
    env = {**os.environ, "IMGUARD_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "imguard", *args], capture_output=True, env=env, cwd=ROOT,
                          timeout=60, **kw)


def test_ca_prints_imguard_pem(tmp_path):
    """`imguard ca` prints the CA certificate (created on first use) and its name says imguard;
    it is the same certificate every time."""
    first = imguard("ca", data_dir=tmp_path)
    assert first.returncode == 0, first.stderr
    cert = x509.load_pem_x509_certificate(first.stdout)
    assert "imguard" in cert.subject.rfc4514_string()
    assert b"PRIVATE KEY" not in first.stdout
    assert imguard("ca", data_dir=tmp_path).stdout == first.stdout
    assert imguard("ca", "--export", "--data-dir", str(tmp_path / "x"), data_dir=tmp_path).stdout.startswith(
        b"-----BEGIN CERTIFICATE-----")


def test_ca_export_der_and_pem(tmp_path):
    """--export PATH writes DER for .der, PEM otherwise."""
    assert imguard("ca", "--export", str(tmp_path / "ca.der"), data_dir=tmp_path).returncode == 0
    der = x509.load_der_x509_certificate((tmp_path / "ca.der").read_bytes())
    assert imguard("ca", "--export", str(tmp_path / "ca.crt"), data_dir=tmp_path).returncode == 0
    pem = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    assert der == pem


def _wait_port(port: int, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("imguard run did not listen")


def test_run_prints_where_it_listens_and_stops_on_sigterm(tmp_path):
    """`imguard run` with the bundled configuration says where it listens, what it inspects and where alerts
    go; it relays traffic; SIGTERM stops it cleanly (exit 0)."""
    echo = socket.socket()
    echo.bind(("127.0.0.1", 0))
    echo.listen()

    def serve():
        while True:
            try:
                conn, _ = echo.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: [c.sendall(d) for d in iter(lambda: c.recv(65536), b"")],
                             daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    port, socks = free_port(), free_port()
    env = {**os.environ, "IMGUARD_DATA_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "imguard", "run",
                             "--mode", f"reverse:tcp://127.0.0.1:{echo.getsockname()[1]}@127.0.0.1:{port}",
                             "--mode", f"socks5@127.0.0.1:{socks}", "--bytestream-relay", f"127.0.0.1:{socks}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        _wait_port(port, proc)
        c = socket.create_connection(("127.0.0.1", port), timeout=10)
        c.sendall(b"ping")
        assert c.recv(10) == b"ping"
        c.close()
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
        echo.close()
    assert f"127.0.0.1:{port}" in out and f"127.0.0.1:{socks}" in out
    assert "xmpp" in out
    assert str(tmp_path / "alerts.jsonl") in out
    assert "imguard gateway stopped" in out


def test_run_refuses_a_relay_without_socks5_listener(tmp_path):
    """A bytestream relay that is not one of our socks5 listeners is a configuration error (exit 2)."""
    r = imguard("run", "--mode", "regular@127.0.0.1:0", "--bytestream-relay", "127.0.0.1:1080", data_dir=tmp_path)
    assert r.returncode == 2
    assert b"socks5" in r.stderr


def test_run_options_build_settings():
    """Repeated --mode replaces the default listeners; --ports adds to the default map port by port;
    --http-ports are numbers; every setting has a help text that says why."""
    import argparse
    import dataclasses

    from imguard.gateway.cli import add_run_arguments, settings_from_args
    from imguard.gateway.settings import GatewaySettings

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    s = settings_from_args(parser.parse_args(["--mode", "transparent@8080", "--mode", "socks5@1080",
                                              "--ports", "5222=none", "--ports", "7000=xmpp",
                                              "--http-ports", "443,5281", "--tcp-timeout", "7200"]))
    assert s.mode == ["transparent@8080", "socks5@1080"]
    assert s.ports[-2:] == ["5222=none", "7000=xmpp"] and "5223=xmpp+tls" in s.ports
    assert s.http_ports == [443, 5281] and s.tcp_timeout == 7200
    defaults = settings_from_args(parser.parse_args([]))
    assert defaults == GatewaySettings() and defaults.tcp_timeout > 600
    for f in dataclasses.fields(GatewaySettings):
        assert len(f.metadata["help"]) > 30, f.name


def test_several_rule_folders_are_loaded_in_place(tmp_path):
    """--rules A --rules B loads the rule files of both folders, in option order, where they are (nothing copied
    into the data folder), and an error names the real file and line."""
    from imguard.policy import PolicyError, load_policy

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    rule = ("- id: {id}\n  title: t\n  severity: low\n  action: alert\n  applies_to: message\n"
            "  match:\n    direction: outbound\n")
    (a / "10-files.yaml").write_text(rule.format(id="from_a"))
    (b / "10-files.yaml").write_text(rule.format(id="from_b"))
    (b / "notes.txt").write_text("x")
    policy = load_policy([a, b])
    assert [r.id for r in policy.rules] == ["from_a", "from_b"]
    assert policy.files == [str(a / "10-files.yaml"), str(b / "10-files.yaml")]
    (b / "20-broken.yaml").write_text(rule.format(id="from_a"))
    with pytest.raises(PolicyError) as e:
        load_policy([a, b])
    assert e.value.errors == [f"{b / '20-broken.yaml'}:1: duplicate rule id 'from_a' (first defined at "
                              f"{a / '10-files.yaml'}:1)"]
    (b / "20-broken.yaml").unlink()
    (a / "groups.yaml").write_text("groups: {}\n")
    (b / "groups.yaml").write_text("groups: {}\n")
    with pytest.raises(PolicyError, match="only one rules folder may hold groups.yaml"):
        load_policy([a, b])


def test_run_help_lists_every_setting_with_its_default(tmp_path):
    """The admin's reference: gateway, inspection, session, sink, archive, quarantine and metrics settings."""
    r = imguard("run", "--help", data_dir=tmp_path)
    assert r.returncode == 0
    text = r.stdout.decode()
    for option in ("--mode", "--max-file-size", "--scan-timeout", "--xmpp-max-stanza-size", "--irc-max-line-length",
                   "--syslog-address", "--webhook-url", "--dedup-window-seconds", "--archive-dsn",
                   "--quarantine-max-bytes", "--metrics-listen", "--fail-mode", "--dcc-relay"):
        assert option in text, option
    assert text.count("(default:") >= 40


def test_run_serves_metrics_and_refuses_bad_sink_settings(tmp_path):
    """--metrics-listen serves Prometheus text on loopback; a bad sink setting is a configuration error."""
    bad = imguard("run", "--mode", "regular@127.0.0.1:0", "--syslog-address", "ftp://nowhere", data_dir=tmp_path)
    assert bad.returncode == 2 and b"syslog" in bad.stderr

    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "IMGUARD_DATA_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "imguard", "run", "--mode", f"regular@127.0.0.1:{port}",
                             "--metrics-listen", str(metrics_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        _wait_port(port, proc)              # the gateway is up (the metrics endpoint starts before it)
        import urllib.request
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert "# TYPE" in body and "imguard_" in body
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode == 0, out
        assert f"127.0.0.1:{metrics_port}/metrics" in out
    finally:
        if proc.poll() is None:
            proc.kill()
