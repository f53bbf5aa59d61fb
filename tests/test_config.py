"""The configuration file of `imguard run` (imguard/config.py): keys are the flags, flags win, errors say file:line;
the shipped example, the systemd unit and docs/settings.md are what the declarations generate."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imguard import cli, config
from imguard.gateway import cli as gateway_cli
from imguard.gateway.settings import GatewaySettings
from imguard.protocols.detect import parse_port_map
from tests.peers.prosody import free_ports, stop_process, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "imguard.yaml"
UNIT = ROOT / "deploy" / "systemd" / "imguard@.service"
SETTINGS_DOC = ROOT / "docs" / "settings.md"


def run_parser():
    parser = cli.build_parser()
    return parser, parser.commands["run"]


def imguard(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imguard", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# --- one source of truth -------------------------------------------------------------------------------

def test_every_option_of_run_is_a_key_with_the_declared_default_and_help():
    """The keys are read off `imguard run`'s own options: none missing, none invented, and a setting's key
    carries its declaration (default and help), not a copy."""
    _, run = run_parser()
    options = {o[2:] for a in run._actions for o in a.option_strings[:1] if o.startswith("--")} - {"help", "config"}
    keys = {k.name: k for k in config.keys(run)}
    assert set(keys) == options
    assert len(keys) >= 106
    for field in dataclasses.fields(GatewaySettings):
        key = keys[field.name.replace("_", "-")]
        assert key.help == field.metadata["help"]
        assert key.default == getattr(GatewaySettings(), field.name)
    assert keys["xmpp-max-held-bytes"].kind is int and keys["quick-ack"].kind is bool
    assert keys["mode"].kind is list and keys["http-ports"].item_kind is int
    assert keys["log-level"].choices == ("DEBUG", "INFO", "WARNING", "ERROR")


def test_shipped_example_is_the_generated_one_and_passes_check():
    """deploy/imguard.yaml is `imguard config example` (`make settings` regenerates it), and `config check` accepts
    it."""
    _, run = run_parser()
    assert EXAMPLE.read_text() == config.example(run), "deploy/imguard.yaml is stale: run `make settings`"
    result = imguard("config", "check", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{EXAMPLE}: OK"


def test_settings_doc_is_current_and_lists_every_key_with_its_default():
    parser, run = run_parser()
    generated = config.docs(parser, {name: parser.commands[name] for name in ("run", "scan", "pcap", "sniff")})
    assert SETTINGS_DOC.read_text() == generated, "docs/settings.md is stale: run `make settings`"
    result = imguard("config", "docs")
    assert result.returncode == 0 and result.stdout == generated
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `--([a-z0-9-]+)` \| (.*?) \|", generated, re.M)}
    for key in config.keys(run):
        assert key.name in rows, key.name
    assert rows["max-upload-size"] == f"`{GatewaySettings().max_upload_size}` (64 MiB)"
    assert rows["quick-ack"] == "`true`"


def test_every_commented_default_of_the_example_is_the_declared_default():
    """Uncomment every setting of the example: the file then sets every key, and the settings it builds are the
    dataclasses' own defaults (except the few the deployment sets), so no commented value misleads."""
    _, run = run_parser()
    text = EXAMPLE.read_text()
    names = {k.name for k in config.keys(run)}
    lines, in_value = [], False
    for line in text.splitlines():
        m = re.match(r"^# ([a-z0-9-]+):( .*)?$", line)
        if m and m.group(1) in names:
            lines.append(line[2:])
            in_value = m.group(2) is None
        elif in_value and line.startswith("# - "):
            lines.append(line[2:])
        else:
            in_value = False
            lines.append(line)
    values = config.parse_text("\n".join(lines), "uncommented", config.keys(run))
    assert {k.replace("_", "-") for k in values} == names
    args = run.parse_args([])
    for dest, value in values.items():
        setattr(args, dest, value)
    settings = gateway_cli.settings_from_args(args)
    deployed = {name.replace("-", "_") for name in config.DEPLOYMENT}
    defaults = GatewaySettings()
    for field in dataclasses.fields(GatewaySettings):
        if field.name == "ports":       # --ports adds to the default map: the same map, the entries twice
            assert parse_port_map(settings.ports) == parse_port_map(defaults.ports)
        elif field.name not in deployed:
            assert getattr(settings, field.name) == getattr(defaults, field.name), field.name
    assert settings.listen_host == "10.0.0.1" and settings.rules == ["/etc/imguard/rules"]
    assert gateway_cli.limits_from_args(args) == gateway_cli.limits_from_args(run.parse_args([]))


# --- errors -----------------------------------------------------------------------------------------------

BAD = """\
listen_host: 10.0.0.1
mode:
  - regular@8080
  - transparnt@8080
quick-ack: yes please
max-upload-size: 64M
inspect-timeout: 3
http-ports: [80, "443"]
log-level: LOUD
lisen-host: 10.0.0.2
xmpp-max-held-bytes: 1048576
"""


def test_check_reports_every_problem_with_file_and_line(tmp_path):
    path = tmp_path / "imguard.yaml"
    path.write_text(BAD)
    result = imguard("config", "check", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{path}:1: unknown setting 'listen_host'; did you mean 'listen-host'?",
        f"{path}:4: mode item: not a listener mode (unknown mode): write transparent@8080, regular@8080, "
        f"socks5@1080 or reverse:tcp://server:5222@5222",
        f"{path}:5: quick-ack: expected true or false, got a string ('yes please')",
        f"{path}:6: max-upload-size: expected a whole number, got a string ('64M')",
        f"{path}:8: http-ports item: expected a whole number, got a string ('443')",
        f"{path}:9: log-level: 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR",
        f"{path}:10: unknown setting 'lisen-host'; did you mean 'listen-host'?",
    ]


@pytest.mark.parametrize("text, line, message", [
    ("mode: [regular@8080\n", 1, "YAML syntax error"),     # where the unclosed list opens
    ("- listen-host\n", 1, "expected a mapping of setting names to values"),
    ("listen-host: a\nlisten-host: b\n", 2, "YAML syntax error: duplicate key 'listen-host'"),
    ("data-dir: 5\n", 1, "data-dir: expected a string, got a number (5) (quote it to make it a string)"),
    ("exclude: {a: 1}\n", 1, "exclude: expected a list (or one value), got a mapping"),
    ("ports:\n  - 5222=xmpp\n  - 6667irc\n", 3, "ports item: port map entry '6667irc': expected PORT=PROTOCOL"),
    ("fail-mode: [irc:parse=ajar]\n", 1, "fail-mode item: fail mode 'irc:parse=ajar': the mode must be"),
])
def test_one_error_each(tmp_path, text, line, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    _, run = run_parser()
    errors = config.check(path, run)
    assert len(errors) == 1 and errors[0].startswith(f"{path}:{line}: {message}"), errors


def test_check_reports_values_the_settings_refuse(tmp_path):
    """A value of the right type that the settings refuse as a whole (a syslog URL) fails the check too."""
    path = tmp_path / "c.yaml"
    path.write_text("syslog-address: ftp://nowhere\n")
    result = imguard("config", "check", str(path))
    assert result.returncode == 2 and result.stderr.startswith(f"{path}: syslog address 'ftp://nowhere'")
    path.write_text("")
    assert imguard("config", "check", str(path)).returncode == 0      # an empty file: every default
    missing = imguard("config", "check", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2 and "cannot read the configuration file" in missing.stderr


# --- precedence --------------------------------------------------------------------------------------------

def parse_with_file(argv: list[str], text: str, tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    parser, run = run_parser()
    full = ["run", "--config", str(path), *argv]
    values = config.read(path, run)
    return config.parse_args(parser, run, full, values)


def test_flags_override_the_file_and_lists_are_replaced_whole(tmp_path):
    text = ("mode: [regular@1111, socks5@1112]\nlisten-host: 10.9.9.9\nquick-ack: false\nlog-level: DEBUG\n"
            "inspect-timeout: 3\nexclude: 192.0.2.0/24\nhttp-ports: [443]\n")
    from_file = parse_with_file([], text, tmp_path)
    assert from_file.mode == ["regular@1111", "socks5@1112"] and from_file.listen_host == "10.9.9.9"
    assert from_file.quick_ack is False and from_file.log_level == "DEBUG" and from_file.inspect_timeout == 3.0
    assert from_file.exclude == ["192.0.2.0/24"]          # one value for a list: a list of one
    assert gateway_cli.settings_from_args(from_file).http_ports == [443]
    flags = parse_with_file(["--mode", "transparent@8081", "--quick-ack", "--log-level", "INFO",
                             "--listen-host", "10.1.1.1"], text, tmp_path)
    assert flags.mode == ["transparent@8081"]             # replaced, not appended to the file's list
    assert flags.quick_ack is True and flags.log_level == "INFO" and flags.listen_host == "10.1.1.1"
    assert flags.inspect_timeout == 3.0 and flags.exclude == ["192.0.2.0/24"]   # the rest still from the file
    untouched = parse_with_file([], "", tmp_path)
    assert gateway_cli.settings_from_args(untouched) == GatewaySettings()


def test_the_unit_command_line_with_the_example(tmp_path):
    """The systemd unit's ExecStart, as systemd would run it for imguard@8081 (empty $IMGUARD_ARGS...), with the
    shipped example as /etc/imguard/imguard.yaml: the worker gets its own transparent port and the file's
    deployment settings."""
    unit = UNIT.read_text()
    assert re.search(r"^Type=notify$", unit, re.M) and re.search(r"^NotifyAccess=main$", unit, re.M)
    exec_start = re.search(r"^ExecStart=(.*?)(?<!\\)$", unit, re.M | re.S).group(1).replace("\\\n", " ")
    argv = shlex.split(re.sub(r"\$\w+", "", exec_start.replace("%i", "8081")))    # the $VARS are empty by default
    assert argv[0].endswith("/bin/imguard") and "--config" in argv
    config_path = argv[argv.index("--config") + 1]
    assert config_path == "/etc/imguard/imguard.yaml"
    argv = argv[1:]
    argv[argv.index("--config") + 1] = str(EXAMPLE)
    parser, run = run_parser()
    args = parser.parse_args(argv)
    args = config.parse_args(parser, run, argv, config.read(args.config, run))
    settings = gateway_cli.settings_from_args(args)
    assert settings.mode[0] == "transparent@8081"
    assert settings.data_dir == "/var/lib/imguard"
    assert settings.rules == ["/etc/imguard/rules"] and settings.signatures == "/etc/imguard/signatures"
    assert "--data-dir /var/lib/imguard" in unit        # the CA step (ExecStartPre) uses the same folder


# --- the real `imguard run` ------------------------------------------------------------------------------

def test_run_reads_the_file_and_a_flag_wins(tmp_path):
    """`imguard run --config FILE --mode regular@B` where the file says regular@A: B accepts connections, A does
    not; the file's data-dir is where the CA and alerts go."""
    port_a, port_b = free_ports(2)
    data = tmp_path / "from-file"
    path = tmp_path / "imguard.yaml"
    path.write_text(f"mode: [regular@{port_a}]\nlisten-host: 127.0.0.1\ndata-dir: {data}\nlog-level: DEBUG\n")
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "imguard", "run", "--config", str(path),
                             "--mode", f"regular@{port_b}"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "IMGUARD_DATA_DIR": str(tmp_path / "env")})
    log.close()
    try:
        wait_for_port(port_b, 60, proc, what="imguard run")
        deadline = time.monotonic() + 10
        while b"imguard gateway running" not in (tmp_path / "run.log").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port_a), timeout=2).close()
        assert (data / "ca").is_dir() and not (tmp_path / "env").exists()
        output = (tmp_path / "run.log").read_text()
        assert f"alerts      {data / 'alerts.jsonl'}" in output
        assert f"regular@{port_a}" not in output
    finally:
        assert stop_process(proc) == 0, (tmp_path / "run.log").read_text()


def test_run_refuses_a_bad_file_before_it_listens(tmp_path):
    port = free_ports(1)[0]
    path = tmp_path / "imguard.yaml"
    path.write_text(f"mode: [regular@{port}]\nmax-upload-sise: 1\n")
    result = imguard("run", "--config", str(path), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"{path}:2: unknown setting 'max-upload-sise'; did you mean 'max-upload-size'?"
    assert not (tmp_path / "data").exists()
