"""Random file contents for end-to-end tests that must come out *clean*.

Plain `os.urandom` bytes are not a neutral file: libmagic names about one random buffer in a hundred as a DOS
COM program (a first byte of 0xE9/0xEB, or INT 21h early on), a zlib stream (0x78 and a header checksum), MPEG
audio and the like, and the bundled policy then blocks it as an executable or as an unreadable archive. A test
that expects the file to arrive then fails about once per CI run. A fixed 128-byte header covers every offset
those magic tests look at, so libmagic sees `application/octet-stream` ("data") and the rest stays random
(incompressible, like a real archive or video)."""

from __future__ import annotations

import os

HEADER = (b"\x00imguard test payload: random bytes after this header\x00" * 3)[:128]


def random_payload(size: int) -> bytes:
    """`size` bytes (at least the header's 128) that libmagic types as plain data."""
    if size < len(HEADER):
        raise ValueError(f"a neutral payload needs at least {len(HEADER)} bytes")
    return HEADER + os.urandom(size - len(HEADER))
