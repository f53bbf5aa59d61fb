"""Write a harness's seed corpus (the stored transcripts and the regression inputs) into a corpus directory.

    .venv/bin/python -m tests.fuzz.seed HARNESS DIR        (make fuzz does this before each run)
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path

from tests.fuzz.regressions import REGRESSIONS


def seeds(name: str) -> list[bytes]:
    harness = importlib.import_module(f"tests.fuzz.fuzz_{name}")
    return list(harness.seeds()) + [data for _, data in REGRESSIONS.get(name, ())]


def main(argv: list[str]) -> None:
    name, directory = argv[1], Path(argv[2])
    directory.mkdir(parents=True, exist_ok=True)
    for data in seeds(name):
        (directory / f"seed-{hashlib.sha1(data).hexdigest()}").write_bytes(data)


if __name__ == "__main__":
    main(sys.argv)
