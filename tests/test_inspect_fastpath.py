"""The inspection fast path gives the reference path's answers (issue 21).

The fast path calls libmagic through ctypes with per-thread cookies (filetype._Cookie) and searches big
buffers for signatures with libc's memmem, without the GIL (polyglot.find). The reference inspector
(`reference=True`) goes through python-magic; both see the same files (every sample of the evasion corpus,
the engine's test samples, generated text, script, binary and random files) and their whole reports must be
equal. polyglot.find is compared with bytes.find on its own.
"""

from __future__ import annotations

import hashlib
import inspect
import random
import threading
from pathlib import Path

import pytest

import evasion_corpus as E
import inspect_samples as S
from imguard.inspect import InspectLimits, Inspector, engine, filetype, load_signatures, polyglot
from imguard.inspect.engine import DIGESTS
from imguard.model import YARA_MATCH

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
    # Big enough (engine.TYPE_BESIDE_MIN) to be typed beside the YARA scan, outer files and members alike: prose,
    # a script, a mislabelled program, a PNG with a zip behind it, archives of such members, an EICAR among them.
    prose = b" ".join(rng.choice(words) for _ in range(20_000))
    script = b"#!/usr/bin/env python3\nimport os\n" + b"print('invoice')\n" * 5000
    program = S.pe() + rng.randbytes(90_000)
    members = {"notes.txt": prose, "tool.py": script, "setup.exe": program, "eicar.com": S.EICAR}
    files += [
        ("big.txt", prose), ("big.py", script), ("invoice.pdf", program),
        ("picture.png", S.png() + S.zip_bytes(members)),
        ("bundle.zip", S.zip_bytes(members)), ("bundle.tar.gz", S.gz(S.tar_bytes(members))),
        ("stored.zip", S.zip_bytes(members, compression=0)),
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
    assert sum(len(data) >= engine.TYPE_BESIDE_MIN for _, data in corpus) >= 10, "files typed beside the scan"
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


TYPED_RULES = """
rule typed_exe { condition: filetype == "EXE" and filesize > 0 }
rule typed_text { strings: $a = "invoice" condition: $a and mime == "text/plain" }
"""


def test_rules_blind_to_the_type_scan_beside_libmagic(inspectors, monkeypatch):
    """Bundled rules name neither `mime` nor `filetype`: libmagic runs on a helper thread, not the caller's."""
    fast, reference = inspectors
    assert fast.type_blind and not reference.type_blind
    assert fast.signatures.externals_used == frozenset()
    threads = []
    identify = fast._magic.identify

    def recording(head: bytes) -> tuple[str, str]:
        threads.append((len(head), threading.current_thread().name))
        return identify(head)

    monkeypatch.setattr(fast._magic, "identify", recording)
    members = {"a.txt": b"invoice " * 9000, "b.exe": S.pe() + bytes(70_000)}     # >= TYPE_BESIDE_MIN each
    report = fast.inspect(S.zip_bytes(members), name="x.zip")
    assert len(report.members) == 2 and report.members[1].family == filetype.EXECUTABLE
    beside = [name for size, name in threads if size == InspectLimits().magic_bytes]
    assert len(beside) == 2 and all(name.startswith("imguard-hash") for name in beside), threads
    assert len(S.zip_bytes(members)) < engine.TYPE_BESIDE_MIN and threads[0][1] == threading.current_thread().name


def test_rules_that_read_the_type_wait_for_it(tmp_path):
    """A rule naming `mime` or `filetype` gets libmagic's answer: the scan waits for it (the reference order), and
    the rule fires where the type is right and only there."""
    (tmp_path / "typed.yar").write_text(TYPED_RULES)
    signatures = load_signatures(tmp_path)
    (tmp_path / "typed.yar").write_text("rule changed_since { condition: true }")   # what was compiled counts
    assert signatures.mentioned == signatures.externals_used == {"mime", "filetype"}
    fast = Inspector(signatures, InspectLimits(verdict_cache_entries=0))
    reference = Inspector(signatures, InspectLimits(verdict_cache_entries=0), reference=True)
    try:
        assert not fast.type_blind
        for name, data, rules in (("a.exe", S.pe(), {"typed_exe"}), ("a.txt", b"an invoice\n" * 20, {"typed_text"}),
                                  ("a.bin", b"invoice" + bytes(range(256)) * 4, set())):
            report = fast.inspect(data, name=name)
            assert report.to_dict() == reference.inspect(data, name=name).to_dict()
            assert {f.data["rule"] for f in report.findings if f.kind == YARA_MATCH} == rules, name
    finally:
        fast.close()
        reference.close()


def test_externals_mentioned_is_conservative(tmp_path):
    """No source to read, or one that cannot be read: every external counts as used (the scan waits)."""
    from imguard.inspect import signatures as sig
    assert sig.externals_mentioned(()) == frozenset(sig.EXTERNALS)
    assert sig.externals_mentioned([str(tmp_path / "missing.yar")]) == frozenset(sig.EXTERNALS)
    (tmp_path / "a.yar").write_text("rule a { condition: mime_type == 1 or filetypes }  // mime\n")
    assert sig.externals_mentioned([str(tmp_path / "a.yar")]) == {"mime"}


def test_the_cache_key_digest_is_not_computed_again(inspectors, monkeypatch):
    """With the verdict cache on, the file's SHA-256 is the one of the cache's key (hashlib computes it once per
    file); the report is the one an inspection without the cache gives, and its SHA-256 is hashlib's."""
    fast, _ = inspectors
    uncached = Inspector(fast.signatures, InspectLimits(verdict_cache_entries=0))
    asked: list[tuple[int, tuple[str, ...]]] = []
    digests = engine._digests

    def recording(data, names):
        asked.append((len(data), tuple(names)))
        return digests(data, names)

    monkeypatch.setattr(engine, "_digests", recording)
    try:
        for size in (3000, engine.TYPE_BESIDE_MIN + 10, engine.HASH_ASYNC_MIN + 10):
            data = S.zip_bytes({"a.txt": random.Random(size).randbytes(size)}, compression=0)
            asked.clear()
            report = fast.inspect(data, name=f"cached{size}.zip")
            assert report.sha256 == hashlib.sha256(data).hexdigest() and report.md5 == hashlib.md5(data).hexdigest()
            assert (len(data), ("sha1", "md5")) in asked and (len(data), DIGESTS) not in asked, asked
            assert any(names == DIGESTS for _, names in asked), "members are hashed with all three"
            assert report.to_dict() == uncached.inspect(data, name=f"cached{size}.zip").to_dict()
    finally:
        uncached.close()
