"""Hostile input never raises: every decoder and session under coverage-guided fuzzing (tests/fuzz/).

Two parts:
- the seeds (the stored transcripts of tests/data, encoded as fuzz inputs) and every input a fuzzer found once
  (tests/fuzz/regressions.py) go through each harness in-process: each must hold, every time;
- a short, bounded atheris (libFuzzer) run per harness, as a subprocess, from those seeds: it must find nothing
  within FUZZ_RUNS inputs or FUZZ_SECONDS. The long run for a release is `make fuzz` (docs/architecture.md).

atheris missing is a failure under CI (it is a test dependency: setup.cfg), a skip elsewhere.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.regressions import REGRESSIONS
from tests.fuzz.run import HARNESSES

ROOT = Path(__file__).resolve().parents[1]
FUZZ_RUNS = int(os.environ.get("IMGUARD_FUZZ_RUNS", "4000"))
FUZZ_SECONDS = int(os.environ.get("IMGUARD_FUZZ_SECONDS", "4"))


def have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("atheris is not installed (pip install -e .[test])")
        return False
    return True


@pytest.mark.parametrize("name", HARNESSES)
def test_seeds_hold(name):
    """Each stored transcript, as a fuzz input, goes through its harness without a finding (the harness itself
    works, and the corpus is the real traffic)."""
    harness = importlib.import_module(f"tests.fuzz.fuzz_{name}")
    seeds = harness.seeds()
    assert seeds, f"{name}: no seeds"
    for seed in seeds:
        harness.target(seed)


@pytest.mark.parametrize("name,what,data", [(name, what, data) for name, found in REGRESSIONS.items()
                                            for what, data in found])
def test_found_once_holds_for_good(name, what, data):
    """An input a fuzzer once found (the bug it showed is named) holds now."""
    importlib.import_module(f"tests.fuzz.fuzz_{name}").target(data)


def test_regressions_name_existing_harnesses():
    """Each regression input belongs to a harness that exists (else it would never run)."""
    assert set(REGRESSIONS) <= set(HARNESSES)


@pytest.mark.parametrize("name", HARNESSES)
def test_bounded_coverage_guided_run_finds_nothing(name, tmp_path):
    """atheris, from the seeds, for FUZZ_RUNS inputs or FUZZ_SECONDS: no exception, no internal error."""
    if not have_atheris():
        pytest.skip("atheris is not installed")
    cmd = [sys.executable, "-m", "tests.fuzz.run", name, f"-runs={FUZZ_RUNS}", f"-max_total_time={FUZZ_SECONDS}",
           f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    crashes = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("timeout-*")) + sorted(tmp_path.glob("oom-*"))
    tail = "\n".join(result.stderr.splitlines()[-40:])
    assert result.returncode == 0 and not crashes, (
        f"{name}: the fuzzer found an input that breaks the contract ({[c.name for c in crashes]}; "
        f"add it to tests/fuzz/regressions.py once fixed):\n{tail}")
    executed = [line for line in result.stderr.splitlines() if "number_of_executed_units" in line]
    assert executed and int(executed[0].split(":")[-1]) > 0, f"{name}: the fuzzer ran nothing:\n{tail}"
