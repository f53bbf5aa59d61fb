"""The evasion corpus: files a real extractor opens and a naive inspector misreads (issue 17).

Each `Sample` is built here at run time, carries the harmless EICAR test string, and names the real
tools that recover it (unzip, `python -m zipfile`, gzip, bzip2, xz, GNU tar, bsdtar, dpkg-deb, cpio,
lha, 7zz, pdfdetach, qpdf...). The payload is never visible in the raw bytes of a sample (it is
compressed, or wrapped in `HIDDEN`, a gzip of EICAR), so only an inspector that sees what the
receiver's tool sees can find it; tests/test_evasion.py checks both sides.

    for sample in build(tmp_path):          # some builders shell out (xorriso, dpkg-deb, 7zz, lha)
        sample.name, sample.data, sample.tools, sample.fmt

Nothing here is malware.
"""

from __future__ import annotations

import base64
import bz2
import lzma
import os
import random
import shutil
import struct
import subprocess
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from imguard.inspect.archives import CHUNK
from inspect_samples import EICAR, gz

HIDDEN = gz(EICAR, name="eicar.com")     # a payload that only a decoder reveals
XZ_PAYLOAD = EICAR * 20                  # xz stores a lone EICAR uncompressed; repeated, it is range coded
_RNG = random.Random(1717)


@dataclass(frozen=True)
class Tool:
    """A real program that opens the sample: `argv` (with {path}) prints the payload on stdout, or
    `extract` (with {path} and {out}) writes files into {out}."""
    name: str
    argv: tuple[str, ...]
    binary: str = ""            # the program that must be installed ("" = argv[0])
    stdin: bool = False         # the sample is fed on stdin (a streaming reader)
    extract: bool = False

    def run(self, path: Path, out: Path) -> bytes:
        """What the tool recovers: its stdout, or every file it extracted, concatenated."""
        argv = [a.format(path=path, out=out) for a in self.argv]
        stdin = open(path, "rb") if self.stdin else subprocess.DEVNULL
        try:
            done = subprocess.run(argv, stdin=stdin, capture_output=True, timeout=60, cwd=out)
        finally:
            if self.stdin:
                stdin.close()
        if not self.extract:
            return done.stdout
        found = b""
        for root, _, files in os.walk(out):
            for name in sorted(files):
                found += (Path(root) / name).read_bytes()
        return found

    def available(self) -> bool:
        return shutil.which(self.binary or self.argv[0]) is not None


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    fmt: str                    # the format, as an unscannable finding must name it when not opened
    tools: tuple[Tool, ...]
    why: str
    opened: bool = True         # the engine opens it (and must find EICAR); else it must be unscannable


def recovered(output: bytes) -> bool:
    """Whether a tool's output holds the payload (EICAR itself, or the gzip that wraps it)."""
    return EICAR in output or HIDDEN in output


UNZIP = Tool("unzip", ("unzip", "-p", "{path}"))
PYZIP = Tool("python -m zipfile", ("python3", "-m", "zipfile", "-e", "{path}", "{out}"), extract=True)
BSDTAR = Tool("bsdtar", ("bsdtar", "-xOf", "{path}"))
BSDTAR_STREAM = Tool("bsdtar (streaming)", ("sh", "-c", "cat {path} | bsdtar -xOf -"), binary="bsdtar")
GZIP = Tool("gzip", ("gzip", "-dc", "{path}"))
BZIP2 = Tool("bzip2", ("bzip2", "-dc", "{path}"))
XZ = Tool("xz", ("xz", "-dc", "{path}"))
TAR = Tool("GNU tar", ("tar", "-xf", "{path}", "-C", "{out}"), extract=True)
SEVENZ = Tool("7zz", ("7zz", "e", "-so", "{path}"))
PIGZ = Tool("pigz", ("pigz", "-dzc", "{path}"))
RPM2CPIO = Tool("rpm2cpio", ("sh", "-c", "rpm2cpio {path} | cpio -i --to-stdout --quiet"), binary="rpm2cpio")
CPIO = Tool("cpio", ("cpio", "-i", "--to-stdout", "--quiet"), stdin=True)
LHA = Tool("lha", ("lha", "pq", "{path}"))
XORRISO = Tool("xorriso", ("xorriso", "-osirrox", "on", "-indev", "{path}", "-extract", "/", "{out}/x"),
               extract=True)
DPKG_DEB = Tool("dpkg-deb", ("sh", "-c", "dpkg-deb --fsys-tarfile {path} | tar -xO"), binary="dpkg-deb")
PDFDETACH = Tool("pdfdetach", ("pdfdetach", "-saveall", "-o", "{out}", "{path}"), extract=True)
QPDF = Tool("qpdf", ("qpdf", "--qdf", "--object-streams=disable", "--decode-level=all", "{path}", "-"))


# --- zip ---------------------------------------------------------------------------------------------

def _local(name: bytes, method: int, crc: int, csize: int, usize: int, flags: int = 0) -> bytes:
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, method, 0, 0x5021, crc, csize, usize,
                       len(name), 0) + name


def _central(name: bytes, method: int, crc: int, csize: int, usize: int, offset: int, flags: int = 0) -> bytes:
    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, flags, method, 0, 0x5021, crc, csize, usize,
                       len(name), 0, 0, 0, 0, 0, offset) + name


def _end(count: int, cd_size: int, cd_offset: int) -> bytes:
    return struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, cd_size, cd_offset, 0)


def _deflate(data: bytes) -> bytes:
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)
    return squeeze.compress(data) + squeeze.flush()


@dataclass
class _Entry:
    """One zip entry, with what its local header and its central directory record each claim."""
    body: bytes
    local_name: bytes
    local_method: int
    local_crc: int
    local_csize: int
    local_usize: int
    central: tuple[bytes, int, int, int, int] | None   # (name, method, crc, csize, usize); None: not listed


def _zip(entries: list[_Entry], prefix: bytes = b"") -> bytes:
    """A zip after `prefix`, with absolute offsets (as `zip -A` writes a self-extractor)."""
    out = bytearray(prefix)
    records = b""
    count = 0
    for entry in entries:
        offset = len(out)
        out += _local(entry.local_name, entry.local_method, entry.local_crc, entry.local_csize,
                      entry.local_usize) + entry.body
        if entry.central is not None:
            records += _central(*entry.central, offset)
            count += 1
    cd_offset = len(out)
    return bytes(out + records + _end(count, len(records), cd_offset))


def _honest(name: bytes, data: bytes) -> _Entry:
    body = _deflate(data)
    crc = zlib.crc32(data)
    return _Entry(body, name, 8, crc, len(body), len(data), (name, 8, crc, len(body), len(data)))


COVER = b"Minutes of the weekly meeting.\n" * 4


def zip_samples() -> list[Sample]:
    body = _deflate(EICAR)
    crc = zlib.crc32(EICAR)
    samples = []
    # The central directory says "stored": a reader of the directory sees the deflate bytes as the
    # content; a streaming reader follows the local header and inflates them.
    stored_view = _Entry(body, b"eicar.com", 8, crc, len(body), len(EICAR),
                         (b"eicar.com", 0, zlib.crc32(body), len(body), len(body)))
    samples.append(Sample("zip-method-differential.zip", _zip([_honest(b"readme.txt", COVER), stored_view]), "zip",
                          (BSDTAR, BSDTAR_STREAM), "local header deflate, central directory stored"))
    # An entry only the local headers list: streaming extractors find it, the directory hides it.
    hidden = _honest(b"eicar.com", EICAR)
    hidden.central = None
    samples.append(Sample("zip-local-only.zip", _zip([hidden, _honest(b"readme.txt", COVER)]), "zip",
                          (BSDTAR_STREAM,), "an entry missing from the central directory"))
    # Sizes: the directory says 10 bytes (with their CRC); the local header, the whole 68.
    short = _Entry(body, b"eicar.com", 8, crc, len(body), len(EICAR),
                   (b"eicar.com", 8, zlib.crc32(EICAR[:10]), len(body), 10))
    samples.append(Sample("zip-size-differential.zip", _zip([short]), "zip", (BSDTAR_STREAM,),
                          "central directory size shorter than the local header's"))
    # Names: the directory says readme.txt, the local header eicar.com.
    named = _honest(b"eicar.com", EICAR)
    named.central = (b"readme.txt",) + named.central[1:]
    samples.append(Sample("zip-name-differential.zip", _zip([named]), "zip", (UNZIP, BSDTAR_STREAM),
                          "central and local names differ"))
    # Behind a prefix, with absolute offsets: a shell script and a PE stub (self-extractors).
    script = b"#!/bin/sh\necho 'installing...'\nexit 0\n" + b"#" * 3000 + b"\n"
    samples.append(Sample("installer.sh", _zip([_honest(b"eicar.com", EICAR)], prefix=script), "zip",
                          (UNZIP, PYZIP, BSDTAR), "zip behind a shell script, absolute offsets"))
    from inspect_samples import pe
    samples.append(Sample("setup.exe", _zip([_honest(b"eicar.com", EICAR)], prefix=pe() + bytes(2048)), "zip",
                          (UNZIP, PYZIP, BSDTAR, SEVENZ), "self-extractor: a zip behind a PE stub"))
    return samples


# --- concatenated streams ----------------------------------------------------------------------------

def _noise(size: int) -> bytes:
    return _RNG.randbytes(size)


def _gzip_member(data: bytes, level: int = 0) -> bytes:
    squeeze = zlib.compressobj(level, zlib.DEFLATED, 31)
    return squeeze.compress(data) + squeeze.flush()


def _sized(make: Callable[[int, int], bytes], target: int, guess: int) -> bytes:
    """make(n, variant) for an n and variant that give exactly `target` bytes (n searched from `guess`)."""
    for variant in range(64):               # Huffman coding skips some lengths: try other content
        n, seen = guess, set()
        for _ in range(12):
            out = make(n, variant)
            if len(out) == target:
                return out
            if n in seen:
                break
            seen.add(n)
            n += target - len(out)
    raise RuntimeError(f"no first member of exactly {target} bytes")


def stream_samples() -> list[Sample]:
    samples = [
        Sample("two-members.txt.gz", _gzip_member(COVER, 6) + _gzip_member(EICAR, 6), "gzip", (GZIP,),
               "payload in the second gzip member"),
        Sample("two-streams.txt.bz2", bz2.compress(COVER) + bz2.compress(EICAR), "bzip2", (BZIP2,),
               "payload in the second bzip2 stream"),
        Sample("two-streams.txt.xz", lzma.compress(COVER) + lzma.compress(XZ_PAYLOAD), "xz", (XZ,),
               "payload in the second xz stream"),
        Sample("padded-streams.txt.xz", lzma.compress(COVER) + bytes(8) + lzma.compress(XZ_PAYLOAD), "xz", (XZ,),
               "xz stream padding between streams"),
    ]
    noise = _noise(CHUNK + 4096)
    for delta in (0, -1, -2, 1):
        target = CHUNK + delta
        first = _sized(lambda n, v: _gzip_member(noise[v:v + n]), target, CHUNK - 100)
        samples.append(Sample(f"boundary{delta:+d}.gz", first + _gzip_member(EICAR, 6), "gzip", (GZIP,),
                              f"second gzip member starts at the read size {delta:+d}"))
    for delta in (0, -1, -2):
        target = CHUNK + delta
        first = _sized(lambda n, v: bz2.compress(noise[v:v + n]), target, CHUNK - 1200)
        samples.append(Sample(f"boundary{delta:+d}.bz2", first + bz2.compress(EICAR), "bzip2", (BZIP2,),
                              f"second bzip2 stream starts at the read size {delta:+d}"))
    first = _sized(lambda n, v: lzma.compress(noise[v:v + n], preset=0), CHUNK, CHUNK - 100)
    samples.append(Sample("boundary+0.xz", first + lzma.compress(XZ_PAYLOAD), "xz", (XZ,),
                          "second xz stream starts at the read size"))
    return samples


# --- tar -----------------------------------------------------------------------------------------------

def _tar_entry(name: str, data: bytes, typeflag: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1577836800
    info.type = typeflag
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    return header + data + bytes(-len(data) % 512)


def tar_samples(tmp: Path) -> list[Sample]:
    samples = []
    cover = _tar_entry("readme.txt", COVER, tarfile.REGTYPE)
    for flag, what in ((b"Q", "a vendor typeflag"), (b"9", "an unknown typeflag"), (b"a", "an unknown typeflag"),
                       (b"7", "contiguous file")):
        data = cover + _tar_entry("eicar.com.gz", HIDDEN, flag) + bytes(1024)
        label = {b"7": "contiguous"}.get(flag, flag.decode())
        samples.append(Sample(f"typeflag-{label}.tar", data, "tar", (TAR, BSDTAR),
                              f"{what} ({flag.decode()!r}) that GNU tar extracts as a regular file"))
    if shutil.which("tar"):
        work = tmp / "sparse"
        work.mkdir(parents=True, exist_ok=True)
        with open(work / "eicar.com.gz", "wb") as handle:      # the payload, a hole, trailing data
            handle.write(HIDDEN)
            handle.seek(1 << 20)
            handle.write(COVER)
        for fmt in ("gnu", "posix"):
            out = tmp / f"sparse-{fmt}.tar"
            subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(out), "-C", str(work), "eicar.com.gz"],
                           check=True)
            samples.append(Sample(out.name, out.read_bytes(), "tar", (TAR,), f"a sparse file ({fmt} format)"))
    return samples


# --- containers ------------------------------------------------------------------------------------

def _files(tmp: Path, name: str, content: dict[str, bytes]) -> Path:
    root = tmp / name
    for path, data in content.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root


def _built(tmp: Path, name: str, argv: list[str], cwd: Path | None = None) -> bytes | None:
    if not shutil.which(argv[0]):
        return None
    subprocess.run(argv, check=True, capture_output=True, cwd=cwd)
    return (tmp / name).read_bytes()


def _crc16(data: bytes) -> int:
    """CRC-16/ARC, the checksum of LHA members."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def _lzh(name: bytes, data: bytes) -> bytes:
    """An LHA archive with one stored (-lh0-) member and a level 0 header (lhasa cannot write archives)."""
    body = b"-lh0-" + struct.pack("<IIIBBB", len(data), len(data), 0x50210000, 0x20, 0, len(name)) + name
    body += struct.pack("<H", _crc16(data))
    return bytes([len(body), sum(body) & 0xFF]) + body + data + b"\0"


_SPEC = """Name: x
Version: 1.0
Release: 1
Summary: x
License: MIT
BuildArch: noarch
%description
x
%install
mkdir -p %{buildroot}/usr/share/x
cp %{_sourcedir}/eicar.com %{buildroot}/usr/share/x/eicar.com
%files
/usr/share/x/eicar.com
"""


def _rpm(tmp: Path) -> bytes:
    top = tmp / "rpmbuild"
    _files(tmp, "rpmbuild/SOURCES", {"eicar.com": EICAR})
    (tmp / "x.spec").write_text(_SPEC)
    subprocess.run(["rpmbuild", "-bb", "--quiet", "--define", f"_topdir {top}", "--define", "_binary_payload w9.xzdio",
                    str(tmp / "x.spec")], check=True, capture_output=True, env={**os.environ, "HOME": str(tmp)})
    return next((top / "RPMS").rglob("*.rpm")).read_bytes()


def container_samples(tmp: Path) -> list[Sample]:
    samples = []
    tree = _files(tmp, "tree", {"docs/readme.txt": COVER, "docs/eicar.com.gz": HIDDEN})
    iso = _built(tmp, "disk.iso", ["xorriso", "-as", "mkisofs", "-quiet", "-R", "-J", "-o", str(tmp / "disk.iso"),
                                   str(tree)])
    if iso is not None:
        samples.append(Sample("disk.iso", iso, "iso9660", (BSDTAR, SEVENZ, XORRISO), "ISO 9660: magic at 32 KiB"))
        # A zip in the ISO's system area (its central directory appended at the end): unzip shows the
        # cover letter, mounting shows the payload.
        cover = _honest(b"readme.txt", COVER)
        local = _local(b"readme.txt", 8, cover.local_crc, cover.local_csize, cover.local_usize) + cover.body
        record = _central(*cover.central, 0)
        both = local + iso[len(local):]
        both += record + _end(1, len(record), len(both))
        samples.append(Sample("iso-and-zip.iso", both, "iso9660", (XORRISO,),
                              "a zip that is also an ISO 9660 image"))
    udf = _built(tmp, "udf.iso", ["genisoimage", "-quiet", "-udf", "-R", "-J", "-o", str(tmp / "udf.iso"), str(tree)])
    if udf is not None:
        samples.append(Sample("udf-bridge.iso", udf, "UDF", (SEVENZ,), "ISO 9660 and UDF (what Windows mounts)"))
    deb_root = _files(tmp, "debroot", {"usr/share/doc/x/eicar.com": EICAR, "DEBIAN/control": (
        b"Package: x\nVersion: 1.0\nArchitecture: all\nMaintainer: a <a@example.org>\nDescription: x\n")})
    deb = _built(tmp, "x.deb", ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(deb_root),
                                str(tmp / "x.deb")])
    if deb is not None:
        samples.append(Sample("x.deb", deb, "deb", (DPKG_DEB,), "a Debian package (ar + data.tar.xz)"))
    if shutil.which("rpmbuild"):
        samples.append(Sample("x.rpm", _rpm(tmp), "rpm", (RPM2CPIO,), "an RPM package (xz payload)"))
    cpio_list = "docs\ndocs/eicar.com.gz\n"
    if shutil.which("cpio"):
        done = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=cpio_list.encode(), cwd=tree,
                              capture_output=True, check=True)
        samples.append(Sample("x.cpio", done.stdout, "cpio", (CPIO, BSDTAR), "a cpio (newc) archive"))
    xar = _built(tmp, "x.xar", ["bsdtar", "--format", "xar", "-cf", str(tmp / "x.xar"), "-C", str(tree), "docs"])
    if xar is not None:
        samples.append(Sample("x.xar", xar, "xar", (BSDTAR,), "a xar archive (gzip-compressed members)"))
    samples.append(Sample("x.lzh", _lzh(b"eicar.com.gz", HIDDEN), "lha", (LHA, BSDTAR),
                          "an LHA archive (-lh0-, level 0 header)"))
    sevenz = _built(tmp, "x.7z", ["7zz", "a", "-bd", "-bso0", str(tmp / "x.7z"), "docs"], cwd=tree)
    if sevenz is not None:
        samples.append(Sample("x.7z", sevenz, "7z", (SEVENZ, BSDTAR), "a 7z archive (LZMA2)"))
        from inspect_samples import pe
        samples.append(Sample("setup-7z.exe", pe() + bytes(2048) + sevenz, "7z", (SEVENZ,),
                              "a 7z self-extractor: the archive behind a PE stub"))
    wim = _built(tmp, "x.wim", ["7zz", "a", "-twim", "-bd", "-bso0", str(tmp / "x.wim"), "docs"], cwd=tree)
    if wim is not None:
        samples.append(Sample("x.wim", wim, "wim", (SEVENZ,), "a Windows imaging (WIM) file", opened=False))
    samples.append(Sample("data.zz", zlib.compress(EICAR), "zlib", (PIGZ,), "a bare zlib stream"))
    return samples


def build(tmp: Path) -> list[Sample]:
    """Every sample; builders whose program is missing are left out (tests/test_evasion.py checks which)."""
    tmp.mkdir(parents=True, exist_ok=True)
    return zip_samples() + stream_samples() + tar_samples(tmp) + container_samples(tmp) + pdf_samples()


# --- PDF ---------------------------------------------------------------------------------------------
# Encoders for the standard filters, written from the PDF specification (ISO 32000-1, 7.4); the real
# readers (poppler's pdfdetach, qpdf) check them.

def ascii_hex(data: bytes) -> bytes:
    return data.hex().upper().encode() + b">"


def ascii85(data: bytes) -> bytes:
    return base64.a85encode(data) + b"~>"


def run_length(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while pos < len(data):
        run = 1
        while pos + run < len(data) and run < 128 and data[pos + run] == data[pos]:
            run += 1
        if run > 1:
            out += bytes([257 - run, data[pos]])
            pos += run
        else:
            literal = data[pos:pos + 128]
            out += bytes([len(literal) - 1]) + literal
            pos += len(literal)
    return bytes(out + b"\x80")


def lzw(data: bytes, early: int = 1) -> bytes:
    """LZW with MSB-first codes of 9-12 bits, a clear code first and an end code last."""
    table = {bytes([i]): i for i in range(256)}
    next_code, width = 258, 9
    codes: list[tuple[int, int]] = [(256, 9)]
    current = b""
    for value in data:
        candidate = current + bytes([value])
        if candidate in table:
            current = candidate
            continue
        codes.append((table[current], width))
        table[candidate] = next_code
        next_code += 1
        if next_code + early - 1 >= (1 << width) and width < 12:      # code 511 added: 10 bits (early)
            width += 1
        if next_code >= 4000:        # the table is nearly full: start again, as encoders do
            codes.append((256, width))
            table = {bytes([i]): i for i in range(256)}
            next_code, width = 258, 9
        current = bytes([value])
    if current:
        codes.append((table[current], width))
        if next_code + early >= (1 << width) and width < 12:    # the decoder adds one more entry
            width += 1
    codes.append((257, width))
    bits, count, out = 0, 0, bytearray()
    for code, size in codes:
        bits = (bits << size) | code
        count += size
        while count >= 8:
            count -= 8
            out.append((bits >> count) & 0xFF)
        bits &= (1 << count) - 1
    if count:
        out.append((bits << (8 - count)) & 0xFF)
    return bytes(out)


def lzw_bomb(size: int) -> bytes:
    """LZW codes that build the longest string of zeros the table holds, then repeat it: about 2,600:1."""
    codes = [256, 0] + list(range(258, 4096))
    longest = sum(1 for _ in range(258, 4096)) + 1
    codes += [4095] * (size // longest + 1) + [257]
    bits, count, out, width, entries = 0, 0, bytearray(), 9, 258
    for index, code in enumerate(codes):
        bits = (bits << width) | code
        count += width
        while count >= 8:
            count -= 8
            out.append((bits >> count) & 0xFF)
        bits &= (1 << count) - 1
        if index >= 2 and entries < 4096:         # the decoder adds an entry from the second code on
            entries += 1
        if entries + 1 >= (1 << width) and width < 12:
            width += 1
    if count:
        out.append((bits << (8 - count)) & 0xFF)
    return bytes(out)


def png_predicted(data: bytes, columns: int) -> bytes:
    """PNG prediction (Predictor 15: each row names its own), cycling through the five row types."""
    out = bytearray()
    prior = bytes(columns)
    for index, start in enumerate(range(0, len(data), columns)):
        row = data[start:start + columns].ljust(columns, b"\0")
        kind = index % 5
        encoded = bytearray()
        for i, x in enumerate(row):
            a = row[i - 1] if i else 0
            b = prior[i]
            c = prior[i - 1] if i else 0
            if kind == 0:
                guess = 0
            elif kind == 1:
                guess = a
            elif kind == 2:
                guess = b
            elif kind == 3:
                guess = (a + b) >> 1
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                guess = a if pa <= pb and pa <= pc else b if pb <= pc else c
            encoded.append((x - guess) & 0xFF)
        out += bytes([kind]) + encoded
        prior = row
    return bytes(out)


def tiff_predicted(data: bytes) -> bytes:
    """TIFF predictor 2, one colour, 8 bits, one row: each byte as the difference from the one before."""
    return bytes((data[i] - (data[i - 1] if i else 0)) & 0xFF for i in range(len(data)))


def pdf_document(objects: list[bytes]) -> bytes:
    """A PDF with these objects (numbered from 1; object 1 is the catalog) and a correct xref table."""
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _stream(entries: bytes, data: bytes) -> bytes:
    return b"<< " + entries + b" /Length %d >>\nstream\n" % len(data) + data + b"\nendstream"


def pdf_attachment(filters: bytes, encoded: bytes, parms: bytes = b"") -> bytes:
    """A PDF whose one attachment, eicar.com, is stored under `filters` (with `parms`)."""
    parms = b" /DecodeParms " + parms if parms else b""
    return pdf_document([
        b"<< /Type /Catalog /Pages 2 0 R /Names << /EmbeddedFiles << /Names [(eicar.com) 4 0 R] >> >> >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>",
        b"<< /Type /Filespec /F (eicar.com) /UF (eicar.com) /EF << /F 5 0 R >> >>",
        _stream(b"/Type /EmbeddedFile /Filter " + filters + parms, encoded),
    ])


def pdf_script(filters: bytes, encoded: bytes, parms: bytes = b"") -> bytes:
    """A PDF that runs a JavaScript stream on opening, the stream under `filters`."""
    parms = b" /DecodeParms " + parms if parms else b""
    return pdf_document([
        b"<< /Type /Catalog /Pages 2 0 R /OpenAction 4 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>",
        b"<< /Type /Action /S /JavaScript /JS 5 0 R >>",
        _stream(b"/Filter " + filters + parms, encoded),
    ])


def pdf_samples() -> list[Sample]:
    words = b"invoice payment meeting project report server client chat message file upload download".split()
    text = b" ".join(_RNG.choice(words) + str(_RNG.randrange(1000)).encode() for _ in range(6000))
    payload = text[:20000] + EICAR + b"\n" + text[20000:]   # codes of every width, a full table, many rows
    script = b"var x = '" + EICAR + b"';\napp.alert(x);\n"
    attach = (PDFDETACH, QPDF)
    early0 = lzw(payload, early=0)
    cases = [
        ("pdf-ahx.pdf", pdf_attachment(b"/ASCIIHexDecode", ascii_hex(payload)), attach),
        ("pdf-a85.pdf", pdf_attachment(b"/ASCII85Decode", ascii85(payload)), attach),
        ("pdf-lzw.pdf", pdf_attachment(b"/LZWDecode", lzw(payload)), attach),
        ("pdf-lzw-early0.pdf", pdf_attachment(b"/LZWDecode", early0, b"<< /EarlyChange 0 >>"), attach),
        ("pdf-rl-ahx.pdf", pdf_attachment(b"[/AHx /RL]", ascii_hex(run_length(payload))), attach),
        ("pdf-a85-flate.pdf", pdf_attachment(b"[/A85 /Fl]", ascii85(zlib.compress(payload))), attach),
        ("pdf-flate-png.pdf", pdf_attachment(b"/FlateDecode", zlib.compress(png_predicted(payload, 8)),
                                             b"<< /Predictor 15 /Columns 8 >>"), attach),
        ("pdf-lzw-tiff.pdf", pdf_attachment(b"[/LZWDecode]", lzw(tiff_predicted(payload)),
                                            b"[<< /Predictor 2 /Columns %d >>]" % len(payload)), attach),
        ("pdf-name-escape.pdf", pdf_attachment(b"/#41SCII#48exDecode", ascii_hex(payload)), attach),
        ("pdf-js-chain.pdf", pdf_script(b"[/ASCII85Decode /LZWDecode /FlateDecode]",
                                        ascii85(lzw(zlib.compress(script)))), (QPDF,)),
        ("pdf-js-png-chain.pdf", pdf_script(b"[/AHx /Fl]", ascii_hex(zlib.compress(png_predicted(script, 5))),
                                            b"[null << /Predictor 12 /Colors 1 /Columns 5 >>]"), (QPDF,)),
    ]
    return [Sample(name, data, "pdf", tools, "a PDF stream under " + name[4:-4]) for name, data, tools in cases]
