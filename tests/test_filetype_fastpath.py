"""One libmagic call where libmagic's description fixes its MIME type (issue 21): same answers as two calls.

filetype.MagicPool.identify asks libmagic for the description and reads the MIME type from it
(filetype.mime_of_description) for plain text, "data" and the common formats; the reference (python-magic,
both calls) is what it is compared with. Corpus: the 39 evasion samples, tests/data, the engine's samples,
files generated per format (text in several encodings and line endings, scripts, markup, images, archives,
executables), the files bench/bench_inspect.py generates for its small-file row, and files of this machine
(/usr: an independent source of real formats). For every file: the same MIME type and description, and the
same whole inspection report (MIME, family, description, type-mismatch and polyglot findings, hashes).
"""

from __future__ import annotations

import inspect
import io
import os
import random
import struct
import sys
import zipfile
from pathlib import Path

import pytest

import evasion_corpus as E
import inspect_samples as S
from imguard.inspect import InspectLimits, Inspector, filetype, load_signatures

ROOT = Path(__file__).resolve().parent.parent
HEAD = InspectLimits().magic_bytes


def bench_small() -> list[tuple[str, bytes]]:
    """Files shaped like bench_inspect.py's small-file row: prose, random bytes, PE-like binaries, 200 B-4 KB."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_inspect as B
    rng = random.Random(1234)
    files = []
    for index in range(150):
        size = rng.randint(200, 4000)
        kind = rng.random()
        data = B.text_blob(size, rng) if kind < 0.6 else (rng.randbytes(size) if kind < 0.8 else
                                                           B.binary_blob(size, rng))
        files.append((f"small_{index}.txt", data))
    return files


def _png(width: int, height: int, depth: int, colour: int, interlace: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return b"\x89PNG\r\n\x1a\n" + S._png_chunk(b"IHDR", ihdr) + S._png_chunk(b"IEND", b"")


def _pe(machine: int, characteristics: int, subsystem: int, plus: bool) -> bytes:
    """A PE header: DOS stub, COFF header, optional header (PE32 or PE32+)."""
    dos = bytearray(b"MZ" + bytes(0x3A) + struct.pack("<I", 0x80)).ljust(0x80, b"\0")
    coff = b"PE\0\0" + struct.pack("<HHIIIHH", machine, 1, 0, 0, 0, 0xF0 if plus else 0xE0, characteristics)
    optional = struct.pack("<H", 0x20B if plus else 0x10B).ljust(0x44, b"\0") + struct.pack("<H", subsystem)
    return bytes(dos) + coff + optional.ljust(0xF0 if plus else 0xE0, b"\0") + b"\0" * 512


def per_format() -> list[tuple[str, bytes]]:
    rng = random.Random(21)
    files = [(f"text_{i}.txt", data) for i, data in enumerate((
        b"hello world\n", b"hello\r\nworld\r\n" * 20, b"old mac\rline\r" * 20, b"x" * 3000, b"a, b\r\nc\n" * 30,
        "Grüße aus Köln\n".encode() * 40, b"\xef\xbb\xbfwith a BOM\n" * 10, "café olé\n".encode("latin-1") * 30,
        "hello\n".encode("utf-16"), "hello\n".encode("utf-32"), b"tab\tseparated\tvalues\n" * 40,
        b"\x1b[1mbold\x1b[0m escape\n" * 5, b"a,b,c\n1,2,3\n4,5,6\n7,8,9\n", b'{"k": [1, 2]}', b"[1, 2, 3]\n",
        b"<?xml version='1.0'?><r/>", b"<!DOCTYPE html><html><body>x</body></html>", b"From: a@b\nTo: c@d\n\nhi\n",
        b"#!/bin/sh\necho hi\n", b"#!/usr/bin/env python3\nimport os\n", b"import os\nprint(os.name)\n",
        b"@echo off\r\nstart calc.exe\r\n", b"Set s = CreateObject(\"WScript.Shell\")\r\n", b"\x00" * 600,
        b"%!PS-Adobe-3.0\n", b"-----BEGIN CERTIFICATE-----\nMIIB\n", b"diff --git a/x b/x\n", b"x"))]
    for i, args in enumerate(((1, 1, 8, 2, 0), (640, 480, 8, 6, 0), (16, 16, 1, 0, 1), (3, 7, 16, 4, 0),
                              (100, 50, 8, 3, 1))):
        files.append((f"image{i}.png", _png(*args) + rng.randbytes(200)))
    files += [("photo.jpg", S.jpeg()), ("anim.gif", S.gif()),
              ("old.gif", b"GIF87a\x02\x00\x03\x00\x80\0\0" + bytes(30))]
    files += [(f"doc{v}.pdf", S.pdf().replace(b"%PDF-1.4", b"%PDF-1." + str(v).encode())) for v in (3, 4, 7)]
    files += [("empty.txt", b""), ("nul.bin", bytes(5)), ("random.bin", rng.randbytes(3000))]
    for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        files.append((f"m{method}.zip", S.zip_bytes({"a.txt": b"hello" * 50, "b/c.bin": rng.randbytes(300)}, method)))
    jar = io.BytesIO()
    with zipfile.ZipFile(jar, "w") as archive:
        archive.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
        archive.writestr("a/B.class", S.java_class())
    files += [("app.jar", jar.getvalue()), ("macro.docm", S.docm()), ("plain.docx", S.docm(with_macro=False))]
    files += [("a.gz", S.gz(b"hello" * 100)), ("b.gz", S.gz(b"x" * 10, name="x.txt")), ("c.bz2", S.bz(b"y" * 900)),
              ("d.xz", S.xz(b"z" * 900)), ("e.tar", S.tar_bytes({"a.txt": b"hi"})),
              ("f.tgz", S.gz(S.tar_bytes({"a.txt": b"hi"})))]
    files += [(f"pe{i}.exe", _pe(*args)) for i, args in enumerate((
        (0x14C, 0x0102, 2, False), (0x14C, 0x2102, 2, False), (0x14C, 0x0102, 3, False), (0x8664, 0x0022, 3, True),
        (0x8664, 0x2022, 2, True), (0xAA64, 0x0022, 3, True)))]
    files += [("tool.exe", S.pe()), ("tool", S.elf()), ("tool.macho", S.macho()), ("fat.macho", S.macho_fat()),
              ("a.class", S.java_class()), ("a.lnk", S.lnk()), ("eicar.com", S.EICAR)]
    return files


def machine_files(limit: int = 700) -> list[tuple[str, bytes]]:
    """Real files of this machine, chosen deterministically: ELF programs and libraries, images, archives, text."""
    found: list[tuple[str, bytes]] = []
    for path in ("/bin/ls", "/usr/bin/python3", os.path.realpath(sys.executable)):     # PIE and plain executables
        with open(path, "rb") as handle:
            found.append((os.path.basename(path), handle.read(HEAD)))
    for root in ("/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/share"):
        paths = []
        for folder, _, names in os.walk(root):
            paths += [os.path.join(folder, name) for name in names]
        for path in sorted(paths)[::max(1, len(paths) // (limit // 3))][:limit // 3]:
            try:
                if os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as handle:
                        found.append((os.path.basename(path), handle.read(HEAD)))
            except OSError:
                continue
    return found


def samples() -> list[tuple[str, bytes]]:
    out = []
    for name, fn in vars(S).items():
        if inspect.isfunction(fn) and fn.__module__ == S.__name__ and not name.startswith("_"):
            if not [p for p in inspect.signature(fn).parameters.values() if p.default is p.empty]:
                out.append((f"{name}.bin", fn()))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[tuple[str, bytes]]:
    evasion = [(s.name, s.data) for s in E.build(tmp_path_factory.mktemp("build"))]
    assert len(evasion) >= 39, "the evasion corpus did not build whole"
    data = [(p.name, p.read_bytes()) for p in sorted((ROOT / "tests" / "data").rglob("*")) if p.is_file()]
    return evasion + data + samples() + per_format() + bench_small()


def test_one_call_answers_as_two(corpus):
    """Every head (and the machine's own files): the fast identify equals python-magic's two calls; every pattern
    of the table is met at least once (a pattern no file exercises is untested)."""
    fast, reference = filetype.MagicPool(), filetype.MagicPool(reference=True)
    used = set()
    heads = [data[:HEAD] for _, data in corpus + machine_files()]
    for head in heads:
        mime, description = reference.identify(head)
        assert fast.identify(head) == (mime, description), description
        derived = filetype.mime_of_description(description)
        assert derived in ("", mime), (description, mime, derived)
        used.update(index for index, (pattern, _) in enumerate(filetype._MIME_OF_DESCRIPTION)
                    if pattern.fullmatch(description))
    unused = [filetype._MIME_OF_DESCRIPTION[i][0].pattern for i in range(len(filetype._MIME_OF_DESCRIPTION))
              if i not in used]
    assert not unused, f"no file of the corpus has these descriptions: {unused}"


def test_one_call_for_the_common_files():
    """The bench's small files (prose, random bytes, PE) cost one libmagic call each, but for the few random ones
    libmagic takes for a format (zlib, an OpenPGP key); a script costs two."""
    pool = filetype.MagicPool()
    calls = []
    mime_cookie, description_cookie = pool._cookies()

    class Counting:
        def __init__(self, cookie, kind: str) -> None:
            self.cookie, self.kind = cookie, kind

        def from_buffer(self, head: bytes) -> str:
            calls.append(self.kind)
            return self.cookie.from_buffer(head)

    pool._local.cookies = (Counting(mime_cookie, "mime"), Counting(description_cookie, "description"))
    two_calls = []
    for _, data in bench_small():
        before = len(calls)
        mime, _ = pool.identify(data[:HEAD])
        if len(calls) - before == 2:
            two_calls.append(mime)
    assert calls.count("description") == 150 and len(two_calls) <= 5, two_calls
    assert "text/plain" not in two_calls and "application/vnd.microsoft.portable-executable" not in two_calls
    calls.clear()
    assert pool.identify(b"#!/bin/sh\necho hi\n")[0] == "text/x-shellscript"
    assert calls == ["description", "mime"]


@pytest.fixture(scope="module")
def inspectors():
    signatures = load_signatures(ROOT / "signatures")
    limits = InspectLimits(verdict_cache_entries=0)
    fast, reference = Inspector(signatures, limits), Inspector(signatures, limits, reference=True)
    yield fast, reference
    fast.close()
    reference.close()


def test_reports_are_equal(inspectors, corpus):
    """The whole report, fast and reference, for every file: the type facts policy reads (mime, family,
    type_mismatch), the description, the polyglot findings, the hashes, the members."""
    fast, reference = inspectors
    seen_families = set()
    for name, data in corpus:
        expected = reference.inspect(data, name=name).to_dict()
        assert fast.inspect(data, name=name).to_dict() == expected, name
        seen_families.add(expected["family"])
    assert {"text", "script", "executable", "archive", "image", "pdf", "office", "other"} <= seen_families
