"""The build hook that puts the bundled policy into the wheel (the metadata is in setup.cfg).

rules/ and signatures/ stay at the top of the repository, where they are edited and reviewed; a wheel built from
it (`python -m build`, `pip wheel .`) carries a copy as imguard/bundled/rules and imguard/bundled/signatures, so an
installed `imguard rules check` or `imguard scan` finds them without a checkout (imguard.runtime.bundled looks
there first, then at the top of a checkout). MANIFEST.in puts them in the sdist the wheel is built from.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

BUNDLED = ("rules", "signatures")


class BuildWithBundled(build_py):
    """build_py, then a copy of each BUNDLED folder into the built package (not for an editable install: it
    reads the folders at the top of the checkout)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for name in BUNDLED:
            target = Path(self.build_lib) / "imguard" / "bundled" / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(name, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))


setup(cmdclass={"build_py": BuildWithBundled})
