"""The folder a module's peers keep their files and logs in."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def kept_if_failed(request, prefix: str) -> Iterator[Path]:
    """A fresh folder under its own `prefix` (pytest's basetemp is shared with other runs, which prune it): removed
    when no test failed while it was in use (unless IMGUARD_E2E_KEEP=1), kept for reading otherwise."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    failed_before = request.session.testsfailed
    yield directory
    if request.session.testsfailed == failed_before and os.environ.get("IMGUARD_E2E_KEEP") != "1":
        shutil.rmtree(directory, ignore_errors=True)
