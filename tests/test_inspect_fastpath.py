"""The inspection fast path gives the reference path's answers (issue 21).

The fast path calls libmagic through ctypes with per-thread cookies (filetype._Cookie) and searches big
buffers for signatures with libc's memmem, without the GIL (polyglot.find). The reference inspector
(`reference=True`) goes through python-magic; both see the same files (every sample of the evasion corpus,
the engine's test samples, generated text, script, binary and random files) and their whole reports must be
equal. polyglot.find is compared with bytes.find on its own.
"""

from __future__ import annotations

import inspect
import random
import threading
from pathlib import Path

import pytest

import evasion_corpus as E
import inspect_samples as S
from imguard.inspect import InspectLimits, Inspector, filetype, load_signatures, polyglot

ROOT = Path(__file__).resolve().parent.parent


def generated() -> list[tuple[str, bytes]]:
    """Files of the kinds a chat carries: prose, scripts without and with a shebang, markup, binary."""
    rng = random.Random(21)
    words = b"the invoice meeting import from def class echo off rem begin end function var use strict".split()
    files = []
    for index in range(40):
        size = rng.randint(1, 9000)
        prose = b" ".join(rng.choice(words) for _ in range(size // 5 + 1))[:size]
        files.append((f"prose{index}.txt", prose))
        files.append((f"random{index}.bin", rng.randbytes(size)))
    files += [
        ("run.py", b"import os\nimport sys\n\ndef main():\n    os.system(sys.argv[1])\n"),
        ("run.sh", b"#!/bin/sh\nrm -rf /tmp/x\n"), ("run.bat", b"@echo off\r\nstart calc.exe\r\n"),
        ("page.html", b"<!DOCTYPE html><html><body><hta:application></body></html>"),
        ("data.json", b'{"a": [1, 2, 3], "b": {"c": null}}'), ("notes.xml", b"<?xml version='1.0'?><a/>"),
        ("utf8.txt", "Grüße, ça va? Привет\n".encode() * 50), ("utf16.txt", "hello world\n".encode("utf-16")),
        ("crlf.txt", b"line one\r\nline two\r\n" * 100), ("long.txt", b"x" * 5000),
        ("empty.txt", b""), ("nul.bin", bytes(300)),
        # Big enough for the GIL-free signature search: a 7z and a RAR carried behind a program.
        ("setup.exe", S.pe() + rng.randbytes(200_000) + b"7z\xbc\xaf\x27\x1c" + rng.randbytes(100)),
        ("setup2.exe", S.pe() + rng.randbytes(100_000) + b"Rar!\x1a\x07\x01\x00" + rng.randbytes(70_000)),
    ]
    return files


def samples() -> list[tuple[str, bytes]]:
    """The engine's own test samples (every builder of inspect_samples that takes no argument)."""
    out = []
    for name, fn in vars(S).items():
        if inspect.isfunction(fn) and fn.__module__ == S.__name__ and not name.startswith("_"):
            required = [p for p in inspect.signature(fn).parameters.values() if p.default is p.empty]
            if not required:
                out.append((f"{name}.bin", fn()))
    return out


@pytest.fixture(scope="module")
def inspectors():
    signatures = load_signatures(ROOT / "signatures")
    fast, reference = Inspector(signatures, InspectLimits()), Inspector(signatures, InspectLimits(), reference=True)
    yield fast, reference
    fast.close()
    reference.close()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[tuple[str, bytes]]:
    evasion = [(s.name, s.data) for s in E.build(tmp_path_factory.mktemp("build"))]
    assert len(evasion) >= 20, "the evasion corpus did not build"
    return evasion + samples() + generated()


def test_fast_and_reference_reports_are_equal(inspectors, corpus):
    """Every file of the corpus: the same report (type, description, hashes, findings, members) both ways."""
    fast, reference = inspectors
    for name, data in corpus:
        assert fast.inspect(data, name=name).to_dict() == reference.inspect(data, name=name).to_dict(), name


def test_libmagic_answers_are_equal(corpus):
    """The direct cookies answer as python-magic does, MIME type and description, on every head."""
    fast, reference = filetype.MagicPool(), filetype.MagicPool(reference=True)
    heads = [data[:InspectLimits().magic_bytes] for _, data in corpus]
    assert any(fast.mime(h).startswith("text/x-") for h in heads), "the corpus has scripts libmagic names"
    for head in heads:
        assert fast.identify(head) == reference.identify(head)


def test_libmagic_cookies_are_per_thread():
    """Each thread gets its own cookie (libmagic cookies are not thread-safe); no lock is shared."""
    pool = filetype.MagicPool()
    seen = []

    def work() -> None:
        pool.mime(b"hello")
        seen.append(pool._local.cookies)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen[0][0] is not seen[1][0] and seen[0][0].cookie != seen[1][0].cookie


def test_find_is_bytes_find():
    """polyglot.find equals bytes.find for every start, needle and size on both sides of FIND_NOGIL_MIN."""
    rng = random.Random(5)
    for _ in range(300):
        size = rng.choice([0, 10, polyglot.FIND_NOGIL_MIN - 1, polyglot.FIND_NOGIL_MIN, 150_000])
        data = bytes(rng.choice(b"7zR!ab") for _ in range(size))
        needle = bytes(rng.choice(b"7zR!ab") for _ in range(rng.randint(1, 5)))
        start = rng.randint(-size - 5, size + 5)
        assert polyglot.find(data, needle, start) == data.find(needle, start), (size, needle, start)
    data = bytes(200_000) + b"7z\xbc\xaf\x27\x1c"
    assert polyglot.find(data, b"7z\xbc\xaf\x27\x1c", 1) == 200_000
    assert polyglot.find(data, b"absent", 0) == -1
