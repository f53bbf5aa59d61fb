"""Archive walking, all in memory: zip (incl. OOXML, JAR), tar, gzip, bzip2, xz.

Each walker yields the members of one container as `Member`s, one at a time, and records problems of
the container itself (corrupt, a limit reached, an unsafe link) in a `Container`. Member names are only
ever labels: nothing is written to disk. Decompression is streamed with a byte cap and a ratio check,
so a bomb never expands past the budget in memory.
"""

from __future__ import annotations

import bz2
import io
import lzma
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Iterator

from imguard.model import REASON_CORRUPT, REASON_ENCRYPTED, REASON_LIMIT, REASON_TOO_LARGE, REASON_UNSUPPORTED

CHUNK = 256 * 1024
RATIO_MIN_BYTES = 1024 * 1024    # the ratio limit applies once a member has expanded past this

ZIP, TAR, GZIP, BZIP2, XZ = "zip", "tar", "gzip", "bzip2", "xz"


def archive_kind(data: bytes, mime: str) -> str | None:
    """Which walker opens this content, by its magic bytes (never by its name)."""
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
    return None


@dataclass
class Budget:
    """What is left for the whole inspection of one file, over all nested archives."""
    members_left: int
    bytes_left: int


@dataclass
class Member:
    name: str
    data: bytes | None = None             # None when not read (encrypted, too large, unsupported)
    size: int = 0                         # bytes read, or the declared size when not read
    encrypted: bool = False
    partial: bool = False                 # data holds only the first bytes (a limit or corruption cut it)
    problem: tuple[str, str] | None = None   # (unscannable reason, detail)
    limit: tuple[str, int] | None = None  # (setting, value) when a limit stopped the read


@dataclass
class Container:
    """Problems of the container itself, filled in while its members are walked."""
    corrupt: list[str] = field(default_factory=list)
    limits: list[tuple[str, int, str]] = field(default_factory=list)   # (setting, value, detail)
    unsafe: list[tuple[str, str]] = field(default_factory=list)         # (member name, detail)


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
                unused = decomp.unused_data
                consumed = pos - len(unused)
                if wbits > 16 and unused[:2] == b"\x1f\x8b":     # another gzip member follows
                    decomp = zlib.decompressobj(wbits)
                    pending = bytes(unused)
                    continue
                return exp.data(), "ok", consumed
    except zlib.error as exc:
        return exp.data(), f"corrupt: {exc}", pos


def _inflate_other(data: bytes, kind: str, cap: int, max_ratio: int) -> tuple[bytes, str, int]:
    exp = _Expansion(cap, max_ratio)
    view = memoryview(data)
    pos = 0
    decomp = bz2.BZ2Decompressor() if kind == BZIP2 else lzma.LZMADecompressor()
    try:
        while True:
            if decomp.eof:
                unused = decomp.unused_data
                if unused.strip(b"\0") and kind == BZIP2 and unused[:3] == b"BZh":
                    decomp = bz2.BZ2Decompressor()      # concatenated bzip2 streams (pbzip2)
                    data, view, pos = unused, memoryview(unused), 0
                    continue
                return exp.data(), "ok", pos - len(unused)
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
    if kind == GZIP:
        out, status, _ = _inflate_zlib(data, 31, cap, max_ratio)
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
    return stripped_name(outer_name, {".xz": "", ".txz": ".tar"})


# --- walkers ----------------------------------------------------------------------------------------

def walk_stream(data: bytes, kind: str, outer_name: str, budget: Budget, max_file_size: int,
                max_ratio: int, container: Container) -> Iterator[Member]:
    """gzip, bzip2, xz: one member, the decompressed stream."""
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


def walk_zip(data: bytes, budget: Budget, max_file_size: int, max_ratio: int,
             container: Container) -> Iterator[Member]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, IndexError) as exc:
        container.corrupt.append(f"zip central directory unreadable ({exc}); reading local headers")
        yield from _walk_zip_local_headers(data, budget, max_file_size, max_ratio, container)
        return
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
            yield Member(name, None, info.file_size, encrypted=True,
                         problem=(REASON_ENCRYPTED, "encrypted zip member cannot be read"))
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


def _walk_zip_local_headers(data: bytes, budget: Budget, max_file_size: int, max_ratio: int,
                            container: Container) -> Iterator[Member]:
    """Recover the members of a zip whose central directory is missing (a truncated transfer)."""
    pos = data.find(b"PK\x03\x04")
    size = len(data)
    while 0 <= pos and pos + 30 <= size:
        flags = int.from_bytes(data[pos + 6:pos + 8], "little")
        method = int.from_bytes(data[pos + 8:pos + 10], "little")
        csize = int.from_bytes(data[pos + 18:pos + 22], "little")
        usize = int.from_bytes(data[pos + 22:pos + 26], "little")
        name_len = int.from_bytes(data[pos + 26:pos + 28], "little")
        extra_len = int.from_bytes(data[pos + 28:pos + 30], "little")
        name = data[pos + 30:pos + 30 + name_len].decode("utf-8" if flags & 0x800 else "cp437", "replace")
        start = pos + 30 + name_len + extra_len
        if start > size:
            break
        if budget.members_left <= 0:
            container.limits.append(("max_archive_members", 0, "members left uninspected"))
            return
        budget.members_left -= 1
        if why := unsafe_name(name):
            container.unsafe.append((name, why))
        next_pos = start + csize if not flags & 0x8 else -1
        if flags & 0x1:
            yield Member(name, None, usize, encrypted=True,
                         problem=(REASON_ENCRYPTED, "encrypted zip member cannot be read"))
        elif name.endswith("/"):
            pass
        elif method in (0, 8):
            cap = min(budget.bytes_left, max_file_size)
            if cap <= 0:
                container.limits.append(("max_expanded_bytes", 0, "decompression budget ran out"))
                return
            if method == 0:
                if flags & 0x8:
                    break     # stored with a data descriptor: the length is unknowable without the directory
                out = data[start:start + min(csize, cap + 1)]
                status = "ok" if len(out) == csize and csize <= cap else ("cap" if csize > cap else "truncated")
                out = out[:cap]
                consumed = len(out)
            else:
                out, status, consumed = _inflate_zlib(data[start:], -15, cap, max_ratio)
                if flags & 0x8:
                    next_pos = start + consumed
            budget.bytes_left -= len(out)
            yield _member_from_stream(name, out, status, cap, budget, max_file_size, max_ratio, "zip member")
        else:
            yield Member(name, None, usize,
                         problem=(REASON_UNSUPPORTED, f"zip compression method {method} not supported"))
        if next_pos < 0:
            next_pos = start
        pos = data.find(b"PK\x03\x04", next_pos)


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
        if not info.isreg():
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
