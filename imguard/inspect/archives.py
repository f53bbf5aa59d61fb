"""Archive walking, all in memory: zip (incl. OOXML, JAR), tar, gzip, bzip2, xz, zlib by hand; ISO 9660,
deb/ar, cpio, xar, LHA, 7z, RAR, CAB, RPM and the zstd/lzip/lz4/compress/lzma filters through libarchive.

Each walker yields the members of one container as `Member`s, one at a time, and records problems of
the container itself (corrupt, a limit reached, an unsafe link) in a `Container`. Member names are only
ever labels: nothing is written to disk (but by the confined tools of encrypted 7z/RAR, inspect/encrypted.py).
Decompression is streamed with a byte cap and a ratio check, so a bomb never expands past the budget in memory.

Walkers read what the receiver's tools read (issue 17): both views of a zip (central directory and
local headers, as a streaming extractor reads it), every member of a gzip and every stream of a bzip2
or xz file, tar entries of any typeflag that carries data (GNU tar extracts unknown ones as files).
"""

from __future__ import annotations

import bz2
import io
import logging
import lzma
import re
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from imguard.model import REASON_CORRUPT, REASON_ENCRYPTED, REASON_LIMIT, REASON_TOO_LARGE, REASON_UNSUPPORTED

CHUNK = 256 * 1024
RATIO_MIN_BYTES = 1024 * 1024    # the ratio limit applies once a member has expanded past this

ZIP, TAR, GZIP, BZIP2, XZ, ZLIB = "zip", "tar", "gzip", "bzip2", "xz", "zlib"
ISO9660 = "iso9660"
STREAMS = (GZIP, BZIP2, XZ, ZLIB)

# Containers libarchive opens, by the MIME type libmagic gives them (format name for findings).
LIBARCHIVE_FORMATS = {
    "application/x-iso9660-image": ISO9660, "application/vnd.debian.binary-package": "deb",
    "application/x-archive": "ar", "application/x-cpio": "cpio", "application/x-xar": "xar",
    "application/x-lzh-compressed": "lha", "application/x-lha": "lha", "application/x-lzh": "lha",
    "application/x-7z-compressed": "7z", "application/x-rar": "rar", "application/vnd.rar": "rar",
    "application/x-rar-compressed": "rar", "application/vnd.ms-cab-compressed": "cab", "application/x-rpm": "rpm",
}
# Single compressed streams libarchive decodes (its "raw" format behind a filter).
LIBARCHIVE_FILTERS = {
    "application/zstd": "zstd", "application/x-zstd": "zstd", "application/x-lzip": "lzip",
    "application/x-lz4": "lz4", "application/x-compress": "compress", "application/x-lzma": "lzma",
}


def archive_kind(data: bytes, mime: str) -> str | None:
    """Which walker opens this content, by its magic bytes or libmagic's MIME type (never by its name)."""
    head = data[:6]
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return ZIP
    if head[:2] == b"\x1f\x8b":
        return GZIP
    if head[:3] == b"BZh":
        return BZIP2
    if head == b"\xfd7zXZ\x00":
        return XZ
    if data[257:262] == b"ustar" or mime == "application/x-tar":
        return TAR
    if mime == "application/zlib" and len(data) > 2 and int.from_bytes(data[:2], "big") % 31 == 0:
        return ZLIB
    if data[0x8001:0x8006] == b"CD001":          # ISO 9660: its magic is at 32 KiB, past libmagic's view
        return ISO9660
    if mime in LIBARCHIVE_FORMATS:
        return LIBARCHIVE_FORMATS[mime]
    if mime in LIBARCHIVE_FILTERS:
        return LIBARCHIVE_FILTERS[mime]
    if zip_behind_prefix(data):
        return ZIP
    return None


def zip_behind_prefix(data: bytes) -> bool:
    """A zip after other data whose central directory holds absolute offsets (`zip -A`, a self-extractor):
    unzip and Python's zipfile open it as it is. (Offsets relative to the zip's start are the polyglot
    check's "zip_prefix" case.)"""
    size = len(data)
    eocd = data.rfind(b"PK\x05\x06", max(0, size - 65557))
    if eocd <= 0 or eocd + 22 > size:
        return False
    cd_size = int.from_bytes(data[eocd + 12:eocd + 16], "little")
    cd_offset = int.from_bytes(data[eocd + 16:eocd + 20], "little")
    if cd_offset + cd_size != eocd or data[cd_offset:cd_offset + 4] != b"PK\x01\x02":
        return False
    first_local = int.from_bytes(data[cd_offset + 42:cd_offset + 46], "little")
    return first_local > 0 and data[first_local:first_local + 4] == b"PK\x03\x04"


def disk_image(data: bytes) -> str:
    """The name of a disk image or filesystem format the engine does not open ("" if none): the ISO/IMG/VHD
    delivery of malware. Their magic is often far from the start (UDF at 32 KiB, VHD and DMG at the end)."""
    for sector in range(0x8000, 0x8000 + 2048 * 16, 2048):
        ident = data[sector + 1:sector + 6]
        if ident in (b"NSR02", b"NSR03"):
            return "UDF"
        if ident == b"TEA01":
            break
    if data[:8] == b"vhdxfile":
        return "VHDX"
    if data[:8] == b"conectix" or data[-512:-504] == b"conectix" or data[-511:-503] == b"conectix":
        return "VHD"
    if len(data) >= 512 and data[-512:-508] == b"koly":
        return "DMG"
    if data[:8] in (b"MSWIM\0\0\0", b"WLPWM\0\0\0"):
        return "WIM"
    if data[:4] == b"QFI\xfb":
        return "QCOW"
    if data[64:68] == b"\x7f\x10\xda\xbe":
        return "VDI"
    if data[:4] == b"KDMV":
        return "VMDK"
    if data[512:520] == b"EFI PART":
        return "GPT disk image"
    if data[510:512] == b"\x55\xaa":
        if data[3:11] == b"NTFS    ":
            return "NTFS disk image"
        if data[54:59] in (b"FAT12", b"FAT16") or data[82:87] == b"FAT32":
            return "FAT disk image"
        if data[3:11] == b"EXFAT   ":
            return "exFAT disk image"
    return ""


@dataclass
class Budget:
    """What is left for the whole inspection of one file, over all nested archives."""
    members_left: int
    bytes_left: int
    max_zip_entries: int = 65535        # InspectLimits.max_zip_entries
    max_pdf_streams: int = 20000        # InspectLimits.max_pdf_streams


@dataclass
class Member:
    name: str
    data: bytes | None = None             # None when not read (encrypted, too large, unsupported)
    size: int = 0                         # bytes read, or the declared size when not read
    encrypted: bool = False
    partial: bool = False                 # data holds only the first bytes (a limit or corruption cut it)
    problem: tuple[str, str] | None = None   # (unscannable reason, detail)
    limit: tuple[str, int] | None = None  # (setting, value) when a limit stopped the read
    opened_with: Any = None               # encrypted and opened: the passwords.Candidate that opened it


@dataclass
class Container:
    """Problems of the container itself, filled in while its members are walked."""
    corrupt: list[str] = field(default_factory=list)
    limits: list[tuple[str, int, str]] = field(default_factory=list)   # (setting, value, detail)
    unsafe: list[tuple[str, str]] = field(default_factory=list)         # (member name, detail)
    differences: list[str] = field(default_factory=list)    # where two views of the container disagree
    unsupported: list[str] = field(default_factory=list)    # what could not be opened, naming the format


def unsafe_name(name: str) -> str:
    """Why a member name would escape an extraction folder ("" if it would not)."""
    normal = name.replace("\\", "/")
    if normal.startswith("/") or (len(normal) > 1 and normal[1] == ":" and normal[0].isalpha()):
        return "absolute path"
    if ".." in normal.split("/"):
        return "parent directory (..) component"
    return ""


class _Expansion:
    """Reads a decompressed stream chunk by chunk under a byte cap and a ratio limit."""

    def __init__(self, cap: int, max_ratio: int) -> None:
        self.cap = cap
        self.max_ratio = max_ratio
        self.chunks: list[bytes] = []
        self.total = 0
        self.stopped = ""           # "cap", "ratio" or ""

    def add(self, piece: bytes, consumed: int) -> bool:
        """Keep `piece`; False when reading must stop (cap or ratio reached)."""
        self.chunks.append(piece)
        self.total += len(piece)
        if self.total > self.cap:
            self.stopped = "cap"
            return False
        if self.total > RATIO_MIN_BYTES and self.total > self.max_ratio * max(consumed, 1):
            self.stopped = "ratio"
            return False
        return True

    def data(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks = []
        return data[:self.cap] if len(data) > self.cap else data


def _inflate_zlib(data: bytes, wbits: int, cap: int, max_ratio: int) -> tuple[bytes, str, int]:
    """Decompress a zlib/gzip/raw-deflate stream. Returns (data, status, input consumed); status is
    "ok", "cap", "ratio", "truncated" or "corrupt: ..."."""
    exp = _Expansion(cap, max_ratio)
    view = memoryview(data)
    pos = 0
    decomp = zlib.decompressobj(wbits)
    pending = b""
    try:
        while True:
            if pending:
                chunk = pending
            elif pos < len(view):
                chunk = view[pos:pos + CHUNK]
                pos += len(chunk)
            else:
                return exp.data(), "truncated", pos
            piece = decomp.decompress(chunk, CHUNK)
            pending = decomp.unconsumed_tail
            consumed = pos - len(pending) - len(decomp.unused_data)
            if piece and not exp.add(piece, consumed):
                return exp.data(), exp.stopped, consumed
            if decomp.eof:
                # Where this member ends, in `data`: wherever that falls relative to the chunks read.
                consumed = pos - len(pending) - len(decomp.unused_data)
                if wbits > 16 and data[consumed:consumed + 2] == b"\x1f\x8b":    # another gzip member
                    decomp = zlib.decompressobj(wbits)
                    pos, pending = consumed, b""
                    continue
                return exp.data(), "ok", consumed
    except zlib.error as exc:
        return exp.data(), f"corrupt: {exc}", pos


_NOT_NUL = re.compile(rb"[^\0]")


def _inflate_other(data: bytes, kind: str, cap: int, max_ratio: int) -> tuple[bytes, str, int]:
    """bzip2 or xz: every stream, as `bzip2 -d` and `xz -d` output them (pbzip2 and pixz write several;
    xz allows NUL stream padding between streams)."""
    exp = _Expansion(cap, max_ratio)
    view = memoryview(data)
    pos = 0
    decomp = bz2.BZ2Decompressor() if kind == BZIP2 else lzma.LZMADecompressor(lzma.FORMAT_XZ)
    try:
        while True:
            if decomp.eof:
                end = pos - len(decomp.unused_data)     # in `data`, wherever the chunk boundary fell
                if kind == BZIP2 and data[end:end + 3] == b"BZh":
                    decomp = bz2.BZ2Decompressor()
                    pos = end
                    continue
                if kind == XZ:
                    following = _NOT_NUL.search(data, end)
                    if following and data[following.start():following.start() + 6] == b"\xfd7zXZ\x00":
                        decomp = lzma.LZMADecompressor(lzma.FORMAT_XZ)
                        pos = following.start()
                        continue
                return exp.data(), "ok", end
            if decomp.needs_input:
                if pos >= len(view):
                    return exp.data(), "truncated", pos
                chunk = view[pos:pos + CHUNK]
                pos += len(chunk)
            else:
                chunk = b""
            piece = decomp.decompress(chunk, CHUNK)
            if piece and not exp.add(piece, pos):
                return exp.data(), exp.stopped, pos
    except (OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        return exp.data(), f"corrupt: {exc}", pos


def decompress(data: bytes, kind: str, cap: int, max_ratio: int) -> tuple[bytes, str]:
    """The decompressed content of a gzip, bzip2 or xz stream, read under `cap` bytes and the ratio limit."""
    if kind in (GZIP, ZLIB):
        out, status, _ = _inflate_zlib(data, 31 if kind == GZIP else 15, cap, max_ratio)
    else:
        out, status, _ = _inflate_other(data, kind, cap, max_ratio)
    return out, status


def gzip_member_name(data: bytes, outer_name: str) -> str:
    """The original name stored in a gzip header (FNAME), else the outer name without .gz."""
    try:
        flags = data[3]
        pos = 10
        if flags & 4:
            pos += 2 + int.from_bytes(data[10:12], "little")
        if flags & 8:
            end = data.index(b"\0", pos, pos + 1024)
            name = data[pos:end].decode("latin-1").replace("\\", "/").rsplit("/", 1)[-1]
            if name:
                return name
    except (IndexError, ValueError):
        pass
    return stripped_name(outer_name, {".gz": "", ".gzip": "", ".tgz": ".tar", ".z": ""})


def stripped_name(outer_name: str, suffixes: dict[str, str]) -> str:
    base = outer_name.replace("\\", "/").rsplit("/", 1)[-1]
    low = base.lower()
    for suffix, replacement in suffixes.items():
        if low.endswith(suffix) and len(base) > len(suffix):
            return base[:-len(suffix)] + replacement
    return f"{base or 'content'}.decompressed"


def member_name_for(kind: str, data: bytes, outer_name: str) -> str:
    if kind == GZIP:
        return gzip_member_name(data, outer_name)
    if kind == BZIP2:
        return stripped_name(outer_name, {".bz2": "", ".tbz2": ".tar", ".tbz": ".tar", ".bzip2": ""})
    if kind == ZLIB:
        return stripped_name(outer_name, {".zz": "", ".zlib": "", ".z": ""})
    return stripped_name(outer_name, {".xz": "", ".txz": ".tar"})


# --- walkers ----------------------------------------------------------------------------------------

def walk_stream(data: bytes, kind: str, outer_name: str, budget: Budget, max_file_size: int,
                max_ratio: int, container: Container) -> Iterator[Member]:
    """gzip, bzip2, xz, zlib: one member, the decompressed stream (all its members or streams)."""
    name = member_name_for(kind, data, outer_name)
    if budget.members_left <= 0:
        container.limits.append(("max_archive_members", 0, "no members left to inspect"))
        return
    if budget.bytes_left <= 0:
        container.limits.append(("max_expanded_bytes", 0, "nothing left of the decompression budget"))
        return
    budget.members_left -= 1
    cap = min(budget.bytes_left, max_file_size)
    out, status = decompress(data, kind, cap, max_ratio)
    budget.bytes_left -= len(out)
    yield _member_from_stream(name, out, status, cap, budget, max_file_size, max_ratio, kind)


def _member_from_stream(name: str, out: bytes, status: str, cap: int, budget: Budget, max_file_size: int,
                        max_ratio: int, what: str) -> Member:
    if status == "ok":
        return Member(name, out, len(out))
    if status == "cap":
        if cap == max_file_size and cap <= budget.bytes_left + len(out):
            return Member(name, out, len(out), partial=True,
                          problem=(REASON_TOO_LARGE, f"expands past {max_file_size} bytes"),
                          limit=("max_file_size", max_file_size))
        return Member(name, out, len(out), partial=True,
                      problem=(REASON_LIMIT, "the decompression budget of the file ran out"),
                      limit=("max_expanded_bytes", cap))
    if status == "ratio":
        return Member(name, out, len(out), partial=True,
                      problem=(REASON_LIMIT, f"{what} data expands more than {max_ratio}:1 (a decompression bomb?)"),
                      limit=("max_compression_ratio", max_ratio))
    if status == "truncated":
        return Member(name, out, len(out), partial=True, problem=(REASON_CORRUPT, f"{what} stream is truncated"))
    return Member(name, out, len(out), partial=True, problem=(REASON_CORRUPT, f"{what} stream: {status[9:]}"))


ZIP_LOCKED = "encrypted zip member cannot be read"     # the detail of a member no password opened


def walk_zip(data: bytes, budget: Budget, max_file_size: int, max_ratio: int,
             container: Container, passwords: Sequence[Any] = ()) -> Iterator[Member]:
    """The members of a zip, both views. Encrypted members are opened with those of `passwords`
    (passwords.Candidate) that verifiably open them, each its own (open_encrypted_zip); the others stay locked."""
    entries = _zip_entries(data)
    if entries > budget.max_zip_entries:        # its directory is not parsed: it could take gigabytes
        container.limits.append(("max_zip_entries", entries, f"the central directory lists {entries} entries"))
        return
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError, OSError, EOFError,
            IndexError) as exc:
        container.corrupt.append(f"zip central directory unreadable ({exc}); reading local headers")
        yield from _walk_zip_local_headers(data, budget, max_file_size, max_ratio, container)
        return
    unlocked: dict[str, tuple[bytes, str, Any]] = {}
    locked = {info.filename: info for info in infos if info.flag_bits & 0x1 and not info.is_dir()}
    if locked and passwords:
        _, unlocked = open_encrypted_zip(data, locked, passwords, budget.bytes_left, max_file_size, max_ratio)
    for info in infos:
        if info.is_dir():
            continue
        if budget.members_left <= 0:
            container.limits.append(("max_archive_members", len(infos), "members left uninspected"))
            return
        budget.members_left -= 1
        name = info.filename
        if why := unsafe_name(name):
            container.unsafe.append((name, why))
        if info.flag_bits & 0x1:
            if name in unlocked:
                out, status, opened_with = unlocked[name]
                if len(out) > budget.bytes_left:
                    container.limits.append(("max_expanded_bytes", 0, "decompression budget ran out"))
                    return
                budget.bytes_left -= len(out)
                member = _member_from_stream(name, out, status, min(budget.bytes_left + len(out), max_file_size),
                                             budget, max_file_size, max_ratio, "zip member")
                member.encrypted, member.opened_with = True, opened_with
                yield member
                continue
            yield Member(name, None, info.file_size, encrypted=True, problem=(REASON_ENCRYPTED, ZIP_LOCKED))
            continue
        if budget.bytes_left <= 0:
            container.limits.append(("max_expanded_bytes", 0, "decompression budget ran out"))
            return
        if info.file_size > RATIO_MIN_BYTES and info.file_size > max_ratio * max(info.compress_size, 1):
            yield Member(name, None, info.file_size,
                         problem=(REASON_LIMIT, f"declared to expand {info.file_size} bytes from {info.compress_size}"),
                         limit=("max_compression_ratio", max_ratio))
            continue
        if info.file_size > max_file_size:
            yield Member(name, None, info.file_size,
                         problem=(REASON_TOO_LARGE, f"declared size {info.file_size} bytes"),
                         limit=("max_file_size", max_file_size))
            continue
        cap = min(budget.bytes_left, max_file_size)
        exp = _Expansion(cap, max_ratio)
        status = "ok"
        try:
            with archive.open(info) as stream:
                while True:
                    piece = stream.read(min(CHUNK, cap + 1 - exp.total))
                    if not piece:
                        break
                    if not exp.add(piece, info.compress_size):
                        status = exp.stopped
                        break
        except NotImplementedError as exc:
            status = f"unsupported: {exc}"
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, lzma.LZMAError, RuntimeError, ValueError) as exc:
            status = f"corrupt: {exc}"
        out = exp.data()
        budget.bytes_left -= len(out)
        if status.startswith("unsupported"):
            yield Member(name, None, info.file_size, problem=(REASON_UNSUPPORTED, f"zip member: {status}"))
            continue
        yield _member_from_stream(name, out, status, cap, budget, max_file_size, max_ratio, "zip member")
    # The second view: the local headers, read front to back as a streaming extractor (bsdtar from a
    # pipe, Java's ZipInputStream, many mail and web scanners) reads them.
    yield from _walk_zip_local_headers(data, budget, max_file_size, max_ratio, container,
                                       {info.header_offset: info for info in infos})


_UNKNOWN_SIZE = 0xFFFFFFFF      # zip64: the size is in the extra field
_AES = 99                       # WinZip AES (AE-1, AE-2): the compression method its entries declare


def open_encrypted_zip(data: bytes, locked: dict[str, zipfile.ZipInfo], passwords: Sequence[Any], bytes_left: int,
                       max_file_size: int, max_ratio: int) -> tuple[Any, dict[str, tuple[bytes, str, Any]]]:
    """Try each candidate (its `.password`) on the encrypted members `locked` (by name), through libarchive, which
    decrypts ZipCrypto and WinZip AES; a candidate that verifiably opens a member opens every member it can, each
    returned as (bytes, status: "ok" or why the read stopped, the candidate), and the members still locked are
    tried again with the candidates that had failed on an earlier one (members with different passwords: a wrong
    password stops at the first locked member, so it costs one read, and the candidates are tried again only after
    one opened something). Verifiably: libarchive accepts a wrong ZipCrypto password once in 256 (its check byte)
    and returns garbage, so a member counts as opened only when its size and CRC-32 are those the central directory
    declares (AE-2 AES entries declare no CRC: their HMAC, which libarchive checks, stands for it).
    (the candidate that opened the first, {name: (bytes, status, candidate)}); (None, {}) when none opens any."""
    try:
        import libarchive
        from libarchive.exception import ArchiveError
    except ImportError:
        return None, {}
    logging.getLogger("libarchive").setLevel(logging.ERROR)
    first, opened, left = None, {}, list(passwords)
    while left:
        for candidate in left:
            still = {name: info for name, info in locked.items() if name not in opened}
            found = _open_with(libarchive, ArchiveError, data, still, candidate.password, bytes_left,
                               max_file_size, max_ratio)
            if found:
                first = first or candidate
                for name, (out, status) in found.items():
                    opened[name] = (out, status, candidate)
                    bytes_left -= len(out)
                left.remove(candidate)
                break                   # from the top: those that failed may open what is still locked
        else:
            break                       # none opened anything more
        if len(opened) == len(locked) or bytes_left <= 0:
            break
    return first, opened


def _open_with(libarchive: Any, error: type, data: bytes, locked: dict[str, zipfile.ZipInfo], password: str,
               bytes_left: int, max_file_size: int, max_ratio: int) -> dict[str, tuple[bytes, str]]:
    opened: dict[str, tuple[bytes, str]] = {}
    verified = False
    try:
        with libarchive.memory_reader(data, format_name="zip", passphrase=password) as archive:
            for entry in archive:
                name = entry.pathname
                info = locked.get(name) if isinstance(name, str) else None
                if info is None or name in opened:
                    continue            # not encrypted (zipfile reads it), or a second entry of the name
                exp = _Expansion(min(bytes_left, max_file_size), max_ratio)
                status = "ok"
                for block in entry.get_blocks():
                    if not exp.add(block, max(info.compress_size, 1)):
                        status = exp.stopped
                        break
                out = exp.data()
                if status == "ok":
                    aes_without_crc = info.compress_type == _AES and not info.CRC
                    if len(out) != info.file_size or (not aes_without_crc and zlib.crc32(out) != info.CRC):
                        if not verified:
                            return {}   # the wrong password (or a corrupt member: it stays locked)
                        continue        # this member has another password: it stays locked
                    verified = True
                opened[name] = (out, status)
                bytes_left -= len(out)
                if bytes_left <= 0:
                    break
    except (error, OSError, ValueError, MemoryError):
        pass                            # "Incorrect passphrase", or hostile data: what was verified stands
    return opened if verified else {}


def _zip_entries(data: bytes) -> int:
    """How many entries the zip's end record (zip64 included) says its central directory lists; 0 if unread."""
    try:
        end = zipfile._EndRecData(io.BytesIO(data))
    except (OSError, ValueError, struct.error, zipfile.BadZipFile):
        return 0
    return int(end[zipfile._ECD_ENTRIES_TOTAL]) if end else 0


def _zip_differences(info: zipfile.ZipInfo, raw_name: bytes, flags: int, method: int, crc: int, csize: int,
                     usize: int) -> list[str]:
    """What a local header says that its central directory record contradicts."""
    central_name = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace")
    found = []
    if raw_name != central_name:
        found.append(f"name {raw_name.decode('cp437')!r} (central directory: {info.orig_filename!r})")
    if method != info.compress_type:
        found.append(f"method {method} (central directory: {info.compress_type})")
    if (flags ^ info.flag_bits) & 0x1:
        found.append("encryption flag")
    if not flags & 0x8:
        for what, local, central in (("crc", crc, info.CRC), ("compressed size", csize, info.compress_size),
                                     ("size", usize, info.file_size)):
            if local != central and local != _UNKNOWN_SIZE:
                found.append(f"{what} {local} (central directory: {central})")
    return found


def _walk_zip_local_headers(data: bytes, budget: Budget, max_file_size: int, max_ratio: int,
                            container: Container,
                            central: dict[int, zipfile.ZipInfo] | None = None) -> Iterator[Member]:
    """The members as the local headers give them. Without `central` (the directory is missing: a
    truncated transfer) every member is read; with it, only those the directory does not list or
    contradicts, each difference recorded (the directory's view was read already)."""
    pos = data.find(b"PK\x03\x04")
    size = len(data)
    seen: set[int] = set()
    while 0 <= pos and pos + 30 <= size:
        flags = int.from_bytes(data[pos + 6:pos + 8], "little")
        method = int.from_bytes(data[pos + 8:pos + 10], "little")
        crc = int.from_bytes(data[pos + 14:pos + 18], "little")
        csize = int.from_bytes(data[pos + 18:pos + 22], "little")
        usize = int.from_bytes(data[pos + 22:pos + 26], "little")
        name_len = int.from_bytes(data[pos + 26:pos + 28], "little")
        extra_len = int.from_bytes(data[pos + 28:pos + 30], "little")
        raw_name = data[pos + 30:pos + 30 + name_len]
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        start = pos + 30 + name_len + extra_len
        if start > size:
            break
        label, known_size = name, not flags & 0x8
        if central is not None:
            info = central.get(pos)
            seen.add(pos)
            if info is not None and (flags & 0x8 or csize == _UNKNOWN_SIZE):
                csize = info.compress_size          # where the data ends, for a descriptor or zip64 entry
                known_size = True
            if info is None:
                container.differences.append(f"{name!r} at offset {pos} is not in the central directory")
            elif found := _zip_differences(info, raw_name, flags, method, crc, csize, usize):
                container.differences.append(f"{name!r} at offset {pos}: local header says " + ", ".join(found))
            else:
                pos = data.find(b"PK\x03\x04", start + csize)
                continue
            label = f"<local@{pos}>/{name}"
        if budget.members_left <= 0:
            container.limits.append(("max_archive_members", 0, "members left uninspected"))
            return
        budget.members_left -= 1
        if why := unsafe_name(name):
            container.unsafe.append((name, why))
        next_pos = start + csize if known_size else -1
        if flags & 0x1:
            yield Member(label, None, usize, encrypted=True,
                         problem=(REASON_ENCRYPTED, "encrypted zip member cannot be read"))
        elif name.endswith("/") and not usize:
            pass
        elif method in (0, 8):
            cap = min(budget.bytes_left, max_file_size)
            if cap <= 0:
                container.limits.append(("max_expanded_bytes", 0, "decompression budget ran out"))
                return
            if method == 0:
                if not known_size:
                    break     # stored with a data descriptor: the length is unknowable without the directory
                out = data[start:start + min(csize, cap + 1)]
                status = "ok" if len(out) == csize and csize <= cap else ("cap" if csize > cap else "truncated")
                out = out[:cap]
                consumed = len(out)
            else:
                out, status, consumed = _inflate_zlib(memoryview(data)[start:], -15, cap, max_ratio)
                if not known_size:
                    next_pos = start + consumed
            budget.bytes_left -= len(out)
            yield _member_from_stream(label, out, status, cap, budget, max_file_size, max_ratio, "zip member")
        else:
            yield Member(label, None, usize,
                         problem=(REASON_UNSUPPORTED, f"zip compression method {method} not supported"))
        if next_pos < 0:
            next_pos = start
        pos = data.find(b"PK\x03\x04", next_pos)
    if central is not None:
        for offset, info in central.items():
            if offset not in seen and not info.is_dir():
                container.differences.append(f"central directory entry {info.orig_filename!r} at offset {offset} "
                                             "is not where a front-to-back reader finds a local header")


def _has_data(data: bytes, start: int) -> bool:
    view = memoryview(data)
    for offset in range(start, len(data), CHUNK):
        if bytes(view[offset:offset + CHUNK]).strip(b"\0"):
            return True
    return False


def walk_tar(data: bytes, budget: Budget, max_file_size: int, container: Container) -> Iterator[Member]:
    """Tar members are slices of data already in memory: they cost no decompression budget."""
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        container.corrupt.append(f"tar unreadable: {exc}")
        return
    while True:
        try:
            info = archive.next()
        except (tarfile.TarError, EOFError, OSError, ValueError, UnicodeError) as exc:
            container.corrupt.append(f"tar damaged after {archive.offset} bytes: {exc}")
            return
        if info is None:
            # tarfile ends quietly at a damaged or truncated header: anything but the zero blocks
            # that close an archive, where it stopped, is content we could not read.
            if archive.offset > len(data):
                container.corrupt.append("tar is truncated")
            elif _has_data(data, archive.offset):
                container.corrupt.append(f"tar header at offset {archive.offset} is damaged or truncated; "
                                         f"{len(data) - archive.offset} bytes not read")
            return
        name = info.name
        if info.issym() or info.islnk():
            if why := unsafe_name(info.linkname):
                container.unsafe.append((name, f"link target {info.linkname!r}: {why}"))
            if why := unsafe_name(name):
                container.unsafe.append((name, why))
            continue
        # Regular files, contiguous and sparse files, and any typeflag tarfile does not know: GNU tar
        # extracts vendor and unknown types as regular files, so their data is read here too.
        if not (info.isreg() or info.type not in tarfile.SUPPORTED_TYPES):
            continue
        if budget.members_left <= 0:
            container.limits.append(("max_archive_members", 0, "members left uninspected"))
            return
        budget.members_left -= 1
        if why := unsafe_name(name):
            container.unsafe.append((name, why))
        if info.size > max_file_size:
            yield Member(name, None, info.size, problem=(REASON_TOO_LARGE, f"{info.size} bytes"),
                         limit=("max_file_size", max_file_size))
            continue
        try:
            stream = archive.extractfile(info)
            content = stream.read(info.size) if stream else b""
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            container.corrupt.append(f"tar member {name!r} unreadable: {exc}")
            return
        if len(content) < info.size:
            yield Member(name, content, len(content), partial=True,
                         problem=(REASON_CORRUPT, f"tar member is truncated ({len(content)} of {info.size} bytes)"))
            return
        yield Member(name, content, len(content))


def walk_libarchive(data: bytes, fmt: str, budget: Budget, max_file_size: int, max_ratio: int,
                    container: Container, passwords: Sequence[Any] = (), limits: Any = None) -> Iterator[Member]:
    """Containers and compressed streams libarchive reads (see LIBARCHIVE_FORMATS and _FILTERS), from
    memory. Every entry that carries data is read, whatever its type, under the same caps as the rest.
    An encrypted 7z or RAR, which libarchive cannot decrypt, is opened with `passwords` by inspect/encrypted.py."""
    if fmt in ("7z", "rar"):
        from imguard.inspect import encrypted          # it imports this module
        opened = encrypted.walk(data, fmt, budget, max_file_size, max_ratio, container, passwords, limits)
        if opened is not None:
            yield from opened
            return
    try:
        import libarchive
        from libarchive.exception import ArchiveError
    except ImportError:          # libarchive-c or libarchive13 missing: say so, never pass the file as clean
        container.unsupported.append(f"{fmt} is not opened: libarchive (libarchive-c) is not installed")
        return
    # libarchive-c logs every warning of the C library ("CRC error", "Skipped N bytes"): on hostile input
    # that is one log line per crafted file. Errors still raise and become findings.
    logging.getLogger("libarchive").setLevel(logging.ERROR)
    raw = fmt in LIBARCHIVE_FILTERS.values()
    format_name = "raw" if raw else "iso9660" if fmt == ISO9660 else "all"
    try:
        with libarchive.memory_reader(data, format_name=format_name, filter_name=fmt if raw else "all") as archive:
            entries = iter(archive)
            while True:
                try:
                    entry = next(entries)
                except StopIteration:
                    return
                member = _libarchive_member(entry, fmt, raw, len(data), budget, max_file_size, max_ratio,
                                            container, ArchiveError)
                if member is False:
                    return
                if member is not None:
                    yield member
                    if member.limit is not None:
                        # Stop here: moving to the next entry would make libarchive decompress the rest of
                        # this one (a solid 7z block), the bomb the limit was there to stop.
                        container.limits.append((member.limit[0], member.limit[1], "walk stopped at a limit"))
                        return
    except ArchiveError as exc:
        container.corrupt.append(f"{fmt} unreadable: {_archive_message(exc)}")
    except (OSError, ValueError, UnicodeError) as exc:
        container.corrupt.append(f"{fmt} unreadable: {type(exc).__name__}: {exc}")


def _text(value: str | bytes | None) -> str:
    """A name libarchive gives as text, or as bytes when it is not valid in the archive's encoding."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value or ""


def _archive_message(exc: Exception) -> str:
    msg = getattr(exc, "msg", None)
    return msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg or exc)


def _libarchive_member(entry, fmt: str, raw: bool, packed: int, budget: Budget, max_file_size: int,
                       max_ratio: int, container: Container, error: type[Exception]) -> Member | None | bool:
    """One libarchive entry as a Member; None to skip it (a directory, a link); False to stop."""
    name = _text(entry.pathname)
    if raw:
        name = "<decompressed>"
    if entry.isdir:
        return None
    if entry.issym or entry.islnk:
        target = _text(entry.linkpath)
        if why := unsafe_name(target):
            container.unsafe.append((name, f"link target {target!r}: {why}"))
        if why := unsafe_name(name):
            container.unsafe.append((name, why))
        if entry.issym or not entry.size:       # a hard link may carry the data (cpio)
            return None
    if budget.members_left <= 0:
        container.limits.append(("max_archive_members", 0, "members left uninspected"))
        return False
    if budget.bytes_left <= 0:
        container.limits.append(("max_expanded_bytes", 0, "decompression budget ran out"))
        return False
    budget.members_left -= 1
    if why := unsafe_name(name):
        container.unsafe.append((name, why))
    cap = min(budget.bytes_left, max_file_size)
    exp = _Expansion(cap, max_ratio)
    status = "ok"
    try:
        for block in entry.get_blocks():
            if not exp.add(block, packed):      # the ratio against the whole container: libarchive does
                status = exp.stopped            # not say how much input one entry used
                break
    except error as exc:
        message = _archive_message(exc)
        out = exp.data()
        budget.bytes_left -= len(out)
        reason = REASON_ENCRYPTED if "encrypt" in message.lower() or "passphrase" in message.lower() \
            else REASON_CORRUPT
        return Member(name, out or None, len(out), encrypted=reason == REASON_ENCRYPTED, partial=bool(out),
                      problem=(reason, f"{fmt} member unreadable: {message}"))
    out = exp.data()
    budget.bytes_left -= len(out)
    return _member_from_stream(name, out, status, cap, budget, max_file_size, max_ratio, f"{fmt} member")
