"""imguard outside a checkout: the wheel `python -m build` makes, installed in a fresh venv, runs with the rules and
signatures it carries; and the data folder and the files holding chat content are private whatever the umask."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from imguard import runtime
from imguard.model import ChatContext

ROOT = Path(__file__).resolve().parents[1]
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SOURCE = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in", "imguard", "rules", "signatures")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A copy of the source (the build writes build/ and *.egg-info next to it), built as the README says (sdist,
    then the wheel from the sdist), the wheel installed with its dependencies in a fresh venv; its bin folder."""
    work = tmp_path_factory.mktemp("package")
    source = work / "source"
    source.mkdir()
    for name in SOURCE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "build", "--outdir", str(work / "dist"), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheel = next((work / "dist").glob("imguard-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for bundled in ("rules", "signatures"):
        for path in (ROOT / bundled).rglob("*"):
            if path.is_file():
                assert f"imguard/bundled/{path.relative_to(ROOT)}" in names, path
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    return venv / "bin"


def run_installed(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["IMGUARD_DATA_DIR"] = str(cwd / "data")
    return subprocess.run([str(bin_dir / "imguard"), *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=env)


def test_installed_wheel_imports_from_the_venv_not_the_checkout(installed, tmp_path):
    result = subprocess.run([str(installed / "python"), "-c", "import imguard, imguard.runtime as r; "
                             "print(imguard.__file__); print(r.BUNDLED_RULES); print(r.BUNDLED_SIGNATURES)"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    module, rules, signatures = result.stdout.split()
    venv = str(installed.parent)
    assert module.startswith(venv) and rules.startswith(venv) and signatures.startswith(venv)
    assert rules.endswith("imguard/bundled/rules") and signatures.endswith("imguard/bundled/signatures")


def test_installed_rules_check_and_test(installed, tmp_path):
    check = run_installed(installed, "rules", "check", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "imguard/bundled/rules" in check.stdout and "imguard/bundled/signatures" in check.stdout
    assert check.stdout.rstrip().splitlines()[-1] == "OK", check.stdout + check.stderr     # no warning either
    tests = run_installed(installed, "rules", "test", cwd=tmp_path)
    assert tests.returncode == 0, tests.stdout[-2000:] + tests.stderr


def test_installed_scan_blocks_eicar_and_passes_a_clean_file(installed, tmp_path):
    (tmp_path / "eicar.com").write_bytes(EICAR)
    (tmp_path / "notes.txt").write_text("minutes of the meeting\n")
    blocked = run_installed(installed, "scan", "eicar.com", cwd=tmp_path)
    assert blocked.returncode == 1, blocked.stdout + blocked.stderr
    assert "EICAR" in blocked.stdout and "decision BLOCK" in blocked.stdout
    clean = run_installed(installed, "scan", "notes.txt", cwd=tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "decision ALLOW" in clean.stdout
    assert mode(tmp_path / "data") == 0o700


def test_installed_config_example_passes_its_own_check(installed, tmp_path):
    example = run_installed(installed, "config", "example", cwd=tmp_path)
    assert example.returncode == 0
    assert example.stdout.startswith("# imguard's configuration file") and "\nlisten-host: 10.0.0.1\n" in example.stdout
    (tmp_path / "imguard.yaml").write_text(example.stdout)
    assert run_installed(installed, "config", "check", "imguard.yaml", cwd=tmp_path).returncode == 0


# --- file modes ------------------------------------------------------------------------------------------

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_data_folder_archive_alerts_and_quarantine_are_private_under_umask_022(tmp_path, umask_022):
    """A blocked file through the gateway's pipeline (alert, archive record, quarantined copy) into a data folder
    that does not exist yet: the folder 0700, every file that holds chat content 0600."""
    data = tmp_path / "deep" / "data"
    pipeline = runtime.build_pipeline(data_dir=data)
    try:
        report, decision = pipeline.check_file(EICAR, ChatContext(protocol="xmpp", sender="a@x", recipients=("b@y",)),
                                               name="eicar.com")
        assert decision.blocked
        pipeline.check_message("hello", ChatContext(protocol="xmpp", sender="a@x", recipients=("b@y",)))
        assert pipeline.archive.flush(10)
        archive = data / "archive.sqlite3"
        private = [data / "alerts.jsonl", archive]
        private += [p for p in (archive.with_name("archive.sqlite3-wal"), archive.with_name("archive.sqlite3-shm"))
                    if p.exists()]
        assert archive.with_name("archive.sqlite3-wal").exists()    # WAL mode: SQLite made it, with the db's mode
        quarantine = data / "quarantine"
        stored = [p for p in quarantine.rglob("*") if p.is_file()]
        # the file, its record, and the quarantine's chained ledger (imguard archive verify): all private
        assert {p.name for p in stored} == {report.sha256, report.sha256 + ".json", "ledger.jsonl"}
        assert mode(data) == 0o700 and mode(quarantine) == 0o700
        assert all(mode(p.parent) == 0o700 for p in stored)
        for path in private + stored:
            assert mode(path) == 0o600, (path, oct(mode(path)))
    finally:
        pipeline.close()
    assert mode(tmp_path / "deep") == 0o755        # a parent the umask governs: only the data folder is imguard's


def test_an_archive_left_world_readable_is_tightened(tmp_path, umask_022):
    data = tmp_path / "data"
    data.mkdir()
    old = data / "archive.sqlite3"
    sqlite3.connect(old).close()
    os.chmod(old, 0o644)
    pipeline = runtime.build_pipeline(data_dir=data)
    pipeline.close()
    assert mode(old) == 0o600
    assert mode(data) == 0o755      # an existing data folder keeps the mode its owner chose


@pytest.mark.parametrize("command, output", [("ca", "BEGIN CERTIFICATE"), ("quarantine list", "sha256")])
def test_other_commands_create_the_data_folder_0700(tmp_path, command, output):
    """`imguard ca` (the unit's ExecStartPre, first to touch the folder) and `imguard quarantine list`."""
    data = tmp_path / "fresh"
    result = subprocess.run(["sh", "-c", f'umask 022 && exec "{sys.executable}" -m imguard {command} '
                                         f'--data-dir "{data}"'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and output in result.stdout, result.stderr
    assert mode(data) == 0o700
