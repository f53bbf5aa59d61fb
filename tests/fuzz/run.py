"""Run a fuzz harness under atheris (libFuzzer), coverage-guided over imguard's decoders, sessions and held-file
tracker.

    .venv/bin/python -m tests.fuzz.run HARNESS [CORPUS_DIR ...] [libFuzzer flags]
    .venv/bin/python -m tests.fuzz.run xmpp -max_total_time=600                  # a release check: make fuzz
    .venv/bin/python -m tests.fuzz.run irc crash-1234                            # re-run one crash input

HARNESS is one of HARNESSES (tests/fuzz/fuzz_<name>.py). With no corpus directory, a temporary one is seeded from
the stored transcripts (tests/data; see each harness's `seeds`) and the regression inputs
(tests/fuzz/regressions.py). Only imguard's protocol and file modules are
instrumented: instrumenting everything loaded (atheris.instrument_all) costs tens of seconds at start.
A crash is written as `crash-<sha1>` in the working directory (libFuzzer's -artifact_prefix), with the traceback.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from pathlib import Path

HARNESSES = ("xmpp", "irc", "msnp", "oscar", "ymsg", "sip", "msrp", "socks5", "httpchat")
INSTRUMENTED = ["imguard.protocols", "imguard.files.tracker", "imguard.files.expected"]
DICTIONARY = Path(__file__).with_name("imguard.dict")        # tokens hostile input is made of (superscript digits...)


def load(name: str):
    """The harness module, with imguard's modules instrumented as they are imported (atheris present) or not."""
    try:
        import atheris
    except ImportError:
        return importlib.import_module(f"tests.fuzz.fuzz_{name}")
    with atheris.instrument_imports(include=INSTRUMENTED):
        return importlib.import_module(f"tests.fuzz.fuzz_{name}")


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in HARNESSES:
        sys.exit(f"usage: python -m tests.fuzz.run {{{','.join(HARNESSES)}}} [CORPUS_DIR ...] [libFuzzer flags]")
    import atheris

    from tests.fuzz.seed import main as seed_main
    name = argv[1]
    harness = load(name)
    rest = list(argv[2:])
    if not any(not a.startswith("-") for a in rest):
        corpus = Path(tempfile.mkdtemp(prefix=f"imguard-fuzz-{name}-"))
        seed_main([argv[0], name, str(corpus)])
        rest.append(str(corpus))
    if not any(a.startswith("-dict=") for a in rest):
        rest.insert(0, f"-dict={DICTIONARY}")
    atheris.Setup([argv[0], *rest], harness.target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
