"""Where a format ends, so data appended after it (a ZIP or a PE behind a PNG, JPEG, GIF or PDF) is found.

Each `*_end` function walks the format's own structure (PNG chunks, JPEG segments and entropy-coded
scans, GIF blocks, PDF's last %%EOF, a zip's end-of-central-directory record) and returns the offset
just after its end, or None when the data is not that format or is cut short. Trailing data that is
only padding (zero bytes, whitespace) is ignored. `zip_prefix_start` finds a ZIP whose central
directory says it starts after a prefix (a self-extractor, or anything with a ZIP appended) by reading
the end-of-central-directory record. `embedded_archives` finds a 7z or RAR archive carried after a
program (a 7z or RAR self-extractor), by its signature and its header's CRC.

`find` is bytes.find without the GIL for big buffers (libc's memmem through ctypes): the signature
searches over a whole file are the one part of inspecting a big file that held the GIL for long (20%
of the pipeline's time on files >= 1 MB), and they serialised two threads inspecting at once.
"""

from __future__ import annotations

import ctypes
import zlib

FIND_NOGIL_MIN = 64 * 1024      # below this, bytes.find is quicker than the ctypes call

try:
    _memmem = ctypes.CDLL(None).memmem
    _memmem.restype = ctypes.c_void_p
    _memmem.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
except (AttributeError, OSError):      # no libc memmem: bytes.find everywhere, only slower with threads
    _memmem = None


def find(data: bytes, needle: bytes, start: int = 0) -> int:
    """data.find(needle, start), with the GIL released during the search for buffers of FIND_NOGIL_MIN
    and more. Same answers (tests/test_inspect_fastpath.py compares them)."""
    size = len(data)
    if _memmem is None or size < FIND_NOGIL_MIN or type(data) is not bytes or not needle:
        return data.find(needle, start)
    start = max(0, start + size if start < 0 else start)
    if start >= size:
        return -1
    # The bytes object is immutable and the caller holds it, so its buffer stays put during the call.
    base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    found = _memmem(base + start, size - start, needle, len(needle))
    return -1 if found is None else found - base

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PADDING = b"\0\r\n\t\f "


def png_end(data: bytes) -> int | None:
    if not data.startswith(_PNG_SIG):
        return None
    pos, size = 8, len(data)
    while pos + 12 <= size:
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        pos += 12 + length
        if kind == b"IEND":
            return pos if pos <= size else None
    return None


def jpeg_end(data: bytes) -> int | None:
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    pos, size = 2, len(data)
    while pos + 2 <= size:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:                    # fill byte
            pos += 1
            continue
        if marker == 0xD9:                    # EOI
            return pos + 2
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        if pos + 4 > size:
            return None
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        pos += 2 + length
        if marker == 0xDA:                    # SOS: entropy-coded data runs to the next real marker
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= size:
                    return None
                following = data[pos + 1]
                if following == 0 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                    pos += 1 if following == 0xFF else 2
                    continue
                break
    return None


def gif_end(data: bytes) -> int | None:
    if not (data.startswith(b"GIF87a") or data.startswith(b"GIF89a")) or len(data) < 13:
        return None
    size = len(data)
    pos = 13
    flags = data[10]
    if flags & 0x80:
        pos += 3 * (2 << (flags & 7))
    while pos < size:
        block = data[pos]
        if block == 0x3B:                      # trailer
            return pos + 1
        if block == 0x21:                      # extension: label, then sub-blocks
            pos += 2
        elif block == 0x2C:                    # image descriptor (+ local colour table), LZW code size
            if pos + 10 > size:
                return None
            local = data[pos + 9]
            pos += 10
            if local & 0x80:
                pos += 3 * (2 << (local & 7))
            pos += 1
        else:
            return None
        while pos < size:                      # sub-blocks until a zero-length one
            length = data[pos]
            pos += 1 + length
            if length == 0:
                break
    return None


def pdf_end(data: bytes) -> int | None:
    if data.find(b"%PDF-", 0, 1024) < 0:
        return None
    eof = data.rfind(b"%%EOF")
    if eof < 0:
        return None
    end = eof + 5
    if data[end:end + 2] == b"\r\n":      # the end-of-line after %%EOF belongs to the PDF
        return end + 2
    return end + 1 if data[end:end + 1] in (b"\r", b"\n") else end


def zip_end(data: bytes) -> int | None:
    """End of a zip that starts at offset 0: its end-of-central-directory record (whose central
    directory ends right where the record starts) plus its comment."""
    if not data.startswith(b"PK\x03\x04"):
        return None
    limit = len(data)
    for _ in range(16):                     # a zip appended to a zip has its own record: look further back
        eocd = data.rfind(b"PK\x05\x06", 0, limit)
        if eocd < 0 or eocd + 22 > len(data):
            return None
        cd_size = int.from_bytes(data[eocd + 12:eocd + 16], "little")
        cd_offset = int.from_bytes(data[eocd + 16:eocd + 20], "little")
        comment = int.from_bytes(data[eocd + 20:eocd + 22], "little")
        if cd_offset + cd_size == eocd or cd_offset == 0xFFFFFFFF:     # (zip64: the record is trusted as is)
            return min(eocd + 22 + comment, len(data))
        limit = eocd
    return None


def zip_prefix_start(data: bytes) -> int | None:
    """Offset of a ZIP that starts after a prefix, from its end-of-central-directory record."""
    size = len(data)
    eocd = data.rfind(b"PK\x05\x06", max(0, size - 65557))
    if eocd < 0 or eocd + 22 > size:
        return None
    cd_size = int.from_bytes(data[eocd + 12:eocd + 16], "little")
    cd_offset = int.from_bytes(data[eocd + 16:eocd + 20], "little")
    start = eocd - cd_size - cd_offset
    if 0 < start < size and data[start:start + 4] == b"PK\x03\x04":
        return start
    return None


def _content_after(data: bytes, end: int) -> bool:
    """Whether anything but padding follows `end`; reads backwards in 64 KiB steps (padding is short)."""
    pos = len(data)
    while pos > end:
        start = max(end, pos - 65536)
        if data[start:pos].strip(_PADDING):
            return True
        pos = start
    return False


FORMAT_ENDS = (("png", png_end), ("jpeg", jpeg_end), ("gif", gif_end), ("pdf", pdf_end), ("zip", zip_end))


def appended_data(data: bytes, zip_prefix: bool = True) -> list[tuple[str, int]]:
    """(host format, offset) of each piece of non-padding data found after a format's end.
    `zip_prefix=False` for archives the engine walks anyway (a tar or a stored zip holding a zip would
    otherwise look like a zip behind a prefix)."""
    found: list[tuple[str, int]] = []
    for fmt, end_of in FORMAT_ENDS:
        end = end_of(data)
        if end is not None and end < len(data):
            if _content_after(data, end):
                found.append((fmt, end))
            break
    if zip_prefix and not data.startswith(b"PK"):
        start = zip_prefix_start(data)
        if start is not None and all(start != offset for _, offset in found) \
                and not any(offset < start for _, offset in found):
            found.append(("zip_prefix", start))
    return found


_7Z_SIG = b"7z\xbc\xaf\x27\x1c"
_RAR4_SIG = b"Rar!\x1a\x07\x00"
_RAR5_SIG = b"Rar!\x1a\x07\x01\x00"
_MAX_CANDIDATES = 16


def _valid_7z(data: bytes, pos: int) -> bool:
    """A 7z signature header: its start-header CRC covers the next 20 bytes (a program that merely
    mentions the signature, 7-Zip itself, has none)."""
    header = data[pos:pos + 32]
    return len(header) == 32 and int.from_bytes(header[8:12], "little") == zlib.crc32(header[12:32])


def _valid_rar(data: bytes, pos: int) -> bool:
    """A RAR 4 main header or a RAR 5 header after the signature, with its CRC right."""
    if data.startswith(_RAR5_SIG, pos):
        start = pos + 8
        size, used = 0, 0
        for shift in range(0, 21, 7):             # header size: a vint of at most 3 bytes
            byte = data[start + 4 + used:start + 5 + used]
            if not byte:
                return False
            size |= (byte[0] & 0x7F) << shift
            used += 1
            if not byte[0] & 0x80:
                break
        block = data[start + 4:start + 4 + used + size]
        return len(block) == used + size and int.from_bytes(data[start:start + 4], "little") == zlib.crc32(block)
    head = data[pos + 7:pos + 20]
    if len(head) < 13 or head[2] != 0x73:
        return False
    size = int.from_bytes(head[5:7], "little")
    block = data[pos + 9:pos + 7 + size]
    return size >= 13 and len(block) == size - 2 and int.from_bytes(head[:2], "little") == zlib.crc32(block) & 0xFFFF


def embedded_archives(data: bytes) -> list[tuple[str, int]]:
    """(format, offset) of a 7z or RAR archive inside data after offset 0, as a 7z or RAR self-extractor
    carries it behind its program: 7-Zip and WinRAR open such a file as the archive."""
    found = []
    for fmt, signature, valid in (("7z", _7Z_SIG, _valid_7z), ("rar", _RAR4_SIG, _valid_rar),
                                  ("rar", _RAR5_SIG, _valid_rar)):
        pos = find(data, signature, 1)
        for _ in range(_MAX_CANDIDATES):
            if pos < 0:
                break
            if valid(data, pos):
                found.append((fmt, pos))
                break
            pos = find(data, signature, pos + 1)
    return found
