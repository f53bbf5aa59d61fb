"""PDF streams, decoded so YARA sees what compression hides.

Since PDF 1.5 the dictionaries that carry /JavaScript, /OpenAction or /Launch may sit inside
compressed object streams, and attachments (/EmbeddedFile) are compressed streams too: scanning the
raw file misses them. `decode_streams` finds the FlateDecode streams that can hold objects, code or
files (images and fonts are left alone: they are most of a PDF's bytes and hold neither), inflates
each under the inspection budget, and returns

- a *decoded view*: the PDF with those streams replaced by their decoded bytes, so a rule that needs
  /OpenAction from the catalog and /JS from an object stream sees both in one buffer;
- the embedded files, each to be inspected as a member.

A stream that does not inflate is skipped (the raw bytes were scanned anyway): real PDFs often carry
a damaged stream, and that is not a reason to call the file uninspectable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator

from imguard.inspect.archives import Budget, _inflate_zlib

_LENGTH = re.compile(rb"/Length\s+(\d+)(?!\s+\d+\s+R)")
_FLATE = re.compile(rb"/(?:FlateDecode|Fl)(?![A-Za-z])")
_SKIP = re.compile(rb"/Subtype\s*/(?:Image|Type1C|CIDFontType0C|OpenType)|/Length[123]\b|/FontFile")
_EMBEDDED = re.compile(rb"/Type\s*/EmbeddedFile\b")
_MAX_DICT = 4096


@dataclass
class Decoded:
    view: bytes | None = None                                   # None when no stream was decoded
    embedded: list[tuple[int, bytes]] = field(default_factory=list)   # (offset of the stream, content)
    limits: list[str] = field(default_factory=list)             # "max_compression_ratio" / "max_expanded_bytes"


def decode_streams(data: bytes, budget: Budget, max_file_size: int, max_ratio: int) -> Decoded:
    result = Decoded()
    pieces: list[bytes] = []
    copied = 0          # data[:copied] is already in pieces (or deliberately left out)
    decoded_any = False
    for keyword, start in _streams(data):
        if start < copied:
            continue
        obj = data.rfind(b"obj", max(0, keyword - _MAX_DICT), keyword)
        dictionary = data[obj:keyword] if obj >= 0 else b""
        end = _stream_end(data, start, dictionary)
        if end is None:
            continue
        embedded = bool(_EMBEDDED.search(dictionary))
        flate = bool(_FLATE.search(dictionary))
        content = b""
        if flate and (embedded or not _SKIP.search(dictionary)):
            if budget.bytes_left <= 0:
                result.limits.append("max_expanded_bytes")
                break
            cap = min(budget.bytes_left, max_file_size)
            content, status = _inflate(data[start:end], cap, max_ratio)
            budget.bytes_left -= len(content)
            if status in ("ratio", "cap"):
                result.limits.append("max_compression_ratio" if status == "ratio" else
                                     "max_expanded_bytes" if cap < max_file_size else "max_file_size")
                content = b""
        elif embedded:
            content = data[start:end]
        # The view keeps the object text between streams and the decoded streams; the raw bytes of
        # streams (compressed, images, fonts) are left out: they were scanned with the file itself.
        pieces.append(data[copied:start])
        copied = end
        if embedded:
            if content:
                result.embedded.append((start, content))
        elif content:
            pieces.append(content)
            decoded_any = True
    if decoded_any:
        pieces.append(data[copied:])
        result.view = b"".join(pieces)
    return result


def _streams(data: bytes) -> Iterator[tuple[int, int]]:
    """(offset of each "stream" keyword, offset of its data): the keyword on its own, not "endstream",
    followed by an end of line. bytes.find is much faster here than a regular expression."""
    pos = data.find(b"stream")
    while pos >= 0:
        after = pos + 6
        if pos == 0 or not data[pos - 1:pos].isalpha():
            if data[after:after + 2] == b"\r\n":
                yield pos, after + 2
            elif data[after:after + 1] in (b"\n", b"\r"):
                yield pos, after + 1
        pos = data.find(b"stream", after)


def _inflate(raw: bytes, cap: int, max_ratio: int) -> tuple[bytes, str]:
    """A zlib stream (what /FlateDecode means); some writers omit the zlib header, so raw deflate is
    tried when zlib cannot even start, and then only a clean result is kept."""
    content, status, _ = _inflate_zlib(raw, 15, cap, max_ratio)
    if not content and status.startswith("corrupt"):
        content, status, _ = _inflate_zlib(raw, -15, cap, max_ratio)
        if status not in ("ok", "ratio", "cap"):
            content = b""
    return content, status


def _stream_end(data: bytes, start: int, dictionary: bytes) -> int | None:
    """Where the stream's data ends: its direct /Length when "endstream" follows it, else the next
    "endstream" keyword."""
    length = _LENGTH.search(dictionary)
    if length:
        end = start + int(length.group(1))
        if data[end:end + 12].lstrip(b"\r\n ").startswith(b"endstream"):
            return end
    end = data.find(b"endstream", start)
    if end < 0:
        return None
    while end > start and data[end - 1] in b"\r\n":
        end -= 1
    return end
