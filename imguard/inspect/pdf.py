"""PDF streams, decoded as a PDF reader decodes them, so YARA sees what the filters hide.

Since PDF 1.5 the dictionaries that carry /JavaScript, /OpenAction or /Launch may sit inside
compressed object streams, and attachments (/EmbeddedFile) are encoded streams too: scanning the
raw file misses them. `decode_streams` finds the streams that can hold objects, code or files
(images and fonts are left alone: they are most of a PDF's bytes and hold neither), runs each through
its whole filter chain (ASCIIHexDecode, ASCII85Decode, LZWDecode, RunLengthDecode, FlateDecode, in
any order, with their DecodeParms: PNG and TIFF predictors, EarlyChange; names written with #xx
escapes are read as a reader reads them) under the inspection budget, and returns

- a *decoded view*: the PDF with those streams replaced by their decoded bytes, so a rule that needs
  /OpenAction from the catalog and /JS from an object stream sees both in one buffer;
- the embedded files, each to be inspected as a member;
- what it could not decode (a filter it does not know, /Crypt, an indirect /Filter): the engine
  reports those as unscannable, since a reader may see content we did not.

A stream that does not decode is skipped (the raw bytes were scanned anyway): real PDFs often carry
a damaged stream, and a reader cannot show more of it than we decoded.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Iterator

from imguard.inspect.archives import RATIO_MIN_BYTES, Budget, _inflate_zlib
from imguard.inspect.polyglot import find

_LENGTH = re.compile(rb"/Length\s+(\d+)(?!\s+\d+\s+R)")
_SKIP = re.compile(rb"/Subtype\s*/(?:Image|Type1C|CIDFontType0C|OpenType)|/Length[123]\b|/FontFile")
_EMBEDDED = re.compile(rb"/Type\s*/EmbeddedFile\b")
_NAME_ESCAPE = re.compile(rb"#([0-9A-Fa-f]{2})")
_FILTER = re.compile(rb"/Filter\s*")
_PARMS = re.compile(rb"/DecodeParms\s*|/DP\s*")
_NAME = re.compile(rb"/([^\s/\[\]<>(){}%]+)")
_INT = re.compile(rb"/(Predictor|Colors|BitsPerComponent|Columns|EarlyChange)\s+(-?\d+)")
_WHITESPACE = re.compile(rb"[\0\t\n\f\r ]+")
_MAX_DICT = 4096

# Standard filter names and their abbreviations (inline images use the short ones).
_ALIASES = {b"AHx": b"ASCIIHexDecode", b"A85": b"ASCII85Decode", b"LZW": b"LZWDecode", b"Fl": b"FlateDecode",
            b"RL": b"RunLengthDecode", b"CCF": b"CCITTFaxDecode", b"DCT": b"DCTDecode"}
# Filters whose output is pixels: nothing after them is code or a document, so decoding stops there.
_IMAGE_FILTERS = frozenset({b"DCTDecode", b"JPXDecode", b"JBIG2Decode", b"CCITTFaxDecode"})


@dataclass
class Decoded:
    view: bytes | None = None                                   # None when no stream was decoded
    embedded: list[tuple[int, bytes]] = field(default_factory=list)   # (offset of the stream, content)
    limits: list[str] = field(default_factory=list)             # "max_compression_ratio" / "max_expanded_bytes"
    undecoded: list[str] = field(default_factory=list)          # streams a reader decodes and we could not


class _Stop(Exception):
    """A filter stage ran into the byte cap or the ratio limit."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def decode_streams(data: bytes, budget: Budget, max_file_size: int, max_ratio: int) -> Decoded:
    result = Decoded()
    pieces: list[bytes] = []
    copied = 0          # data[:copied] is already in pieces (or deliberately left out)
    decoded_any = False
    for count, (keyword, start) in enumerate(_streams(data)):
        if count >= budget.max_pdf_streams:
            result.limits.append("max_pdf_streams")
            break
        if start < copied:
            continue
        obj = data.rfind(b"obj", max(0, keyword - _MAX_DICT), keyword)
        dictionary = data[obj:keyword] if obj >= 0 else b""
        if b"#" in dictionary:
            dictionary = _NAME_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), dictionary)
        end = _stream_end(data, start, dictionary)
        if end is None:
            continue
        embedded = bool(_EMBEDDED.search(dictionary))
        content = b""
        if embedded or not _SKIP.search(dictionary):
            try:
                filters, parms = _filter_chain(dictionary)
            except ValueError as exc:
                result.undecoded.append(f"stream at offset {start}: {exc}")
                filters, parms = None, []
            if filters:
                if budget.bytes_left <= 0:
                    result.limits.append("max_expanded_bytes")
                    break
                cap = min(budget.bytes_left, max_file_size)
                content, status = decode(data[start:end], filters, parms, cap, max_ratio)
                budget.bytes_left -= len(content)
                if status in ("ratio", "cap"):
                    result.limits.append("max_compression_ratio" if status == "ratio" else
                                         "max_expanded_bytes" if cap < max_file_size else "max_file_size")
                    content = b""
                elif status.startswith("unsupported") and (embedded or not status.endswith("(image)")):
                    result.undecoded.append(f"stream at offset {start}: {status}")
            elif embedded and filters is not None:
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


# --- the dictionary ----------------------------------------------------------------------------------

def _filter_chain(dictionary: bytes) -> tuple[list[bytes], list[dict[bytes, int]]]:
    """The stream's filters (full names, in order) and their decode parameters. ValueError when a
    reader would follow something we do not (an indirect reference)."""
    found = _FILTER.search(dictionary)
    if not found:
        return [], []
    value = dictionary[found.end():]
    if re.match(rb"\d+\s+\d+\s+R", value):
        raise ValueError("/Filter is an indirect reference")
    if value[:1] == b"[":
        names = _NAME.findall(value[1:value.find(b"]")])
    else:
        name = _NAME.match(value)
        names = [name.group(1)] if name else []
    filters = [_ALIASES.get(n, n) for n in names]
    parms: list[dict[bytes, int]] = [{} for _ in filters]
    found = _PARMS.search(dictionary)
    if found:
        value = dictionary[found.end():]
        if re.match(rb"\d+\s+\d+\s+R", value):
            raise ValueError("/DecodeParms is an indirect reference")
        if value[:1] == b"[":
            items = _parm_items(value[1:])
        else:
            items = [_balanced(value)] if value[:2] == b"<<" else []
        for i, item in enumerate(items[:len(filters)]):
            parms[i] = {k: int(v) for k, v in _INT.findall(item)}
    return filters, parms


def _balanced(value: bytes) -> bytes:
    """The dictionary `<< ... >>` at the start of value (nested ones included)."""
    depth, pos = 0, 0
    while pos < len(value) - 1:
        pair = value[pos:pos + 2]
        if pair == b"<<":
            depth += 1
            pos += 2
        elif pair == b">>":
            depth -= 1
            pos += 2
            if depth == 0:
                return value[:pos]
        else:
            pos += 1
    return value


def _parm_items(value: bytes) -> list[bytes]:
    """The elements of a /DecodeParms array: dictionaries or null, in order, up to its `]`."""
    items, pos = [], 0
    while pos < len(value):
        if value[pos:pos + 2] == b"<<":
            item = _balanced(value[pos:])
            items.append(item)
            pos += len(item)
        elif value[pos:pos + 4] == b"null":
            items.append(b"")
            pos += 4
        elif value[pos:pos + 1] == b"]":
            break
        else:
            pos += 1
    return items


# --- the filters ---------------------------------------------------------------------------------------

def decode(raw: bytes, filters: list[bytes], parms: list[dict[bytes, int]], cap: int,
           max_ratio: int) -> tuple[bytes, str]:
    """Run `raw` through the chain. Status: "ok", "cap", "ratio", "corrupt: ..." (what was decoded is
    kept) or "unsupported: NAME" (decoding stopped there; " (image)" for a filter whose output is pixels)."""
    data = raw
    for name, parm in zip(filters, parms, strict=True):
        if name in _IMAGE_FILTERS:
            return data, f"unsupported: /{name.decode('latin-1')} (image)"
        stage = _STAGES.get(name)
        if stage is None:
            return data, f"unsupported: /{name.decode('latin-1', 'replace')[:40]}"
        try:
            data, status = stage(data, parm, cap, max_ratio)
            if status == "ok" and parm.get(b"Predictor", 1) > 1 and name in (b"FlateDecode", b"LZWDecode"):
                data = _unpredict(data, parm)
        except _Stop as stop:
            return b"", stop.status
        except (ValueError, binascii.Error) as exc:
            return data if data is not raw else b"", f"corrupt: {exc}"
        if len(data) > cap:
            return b"", "cap"
        if len(data) > RATIO_MIN_BYTES and len(data) > max_ratio * max(len(raw), 1):
            return b"", "ratio"
        if status not in ("ok", "truncated") and not status.startswith("corrupt"):
            return b"", status
    return data, "ok"


def _flate(data: bytes, parm: dict[bytes, int], cap: int, max_ratio: int) -> tuple[bytes, str]:
    """A zlib stream (what /FlateDecode means); some writers omit the zlib header, so raw deflate is
    tried when zlib cannot even start, and then only a clean result is kept."""
    content, status, _ = _inflate_zlib(data, 15, cap, max_ratio)
    if not content and status.startswith("corrupt"):
        content, status, _ = _inflate_zlib(data, -15, cap, max_ratio)
        if status not in ("ok", "ratio", "cap"):
            content = b""
    return content, status


def _ascii_hex(data: bytes, parm: dict[bytes, int], cap: int, max_ratio: int) -> tuple[bytes, str]:
    end = data.find(b">")
    digits = _WHITESPACE.sub(b"", data if end < 0 else data[:end])
    if len(digits) % 2:
        digits += b"0"           # an odd final digit is followed by an implied 0
    return binascii.unhexlify(digits), "ok"


def _ascii85(data: bytes, parm: dict[bytes, int], cap: int, max_ratio: int) -> tuple[bytes, str]:
    text = _WHITESPACE.sub(b"", data)
    if text.startswith(b"<~"):
        text = text[2:]
    end = text.find(b"~>")
    if end >= 0:
        text = text[:end]
    if len(text) > 5 * (cap // 4 + 1) and b"z" not in text:
        raise _Stop("cap")
    if text.count(b"z") * 4 > cap:
        raise _Stop("cap")
    return base64.a85decode(text), "ok"


def _run_length(data: bytes, parm: dict[bytes, int], cap: int, max_ratio: int) -> tuple[bytes, str]:
    out = bytearray()
    pos, size = 0, len(data)
    while pos < size:
        length = data[pos]
        if length == 128:
            break
        if length < 128:
            out += data[pos + 1:pos + 2 + length]
            pos += 2 + length
        else:
            out += data[pos + 1:pos + 2] * (257 - length)
            pos += 2
        if len(out) > cap:
            raise _Stop("cap")
        if len(out) > RATIO_MIN_BYTES and len(out) > max_ratio * pos:
            raise _Stop("ratio")
    return bytes(out), "ok"


def _lzw(data: bytes, parm: dict[bytes, int], cap: int, max_ratio: int) -> tuple[bytes, str]:
    """LZW as PDF and TIFF use it: MSB-first codes of 9 to 12 bits, 256 clears, 257 ends; the code
    width grows one code early (EarlyChange 1, the default)."""
    early = 1 if parm.get(b"EarlyChange", 1) else 0
    out = bytearray()
    table: list[bytes] = [bytes([i]) for i in range(256)] + [b"", b""]
    width, previous = 9, b""
    buffer, bits = 0, 0
    pos = 0
    for byte in data:
        pos += 1
        buffer = (buffer << 8) | byte
        bits += 8
        while bits >= width:
            bits -= width
            code = (buffer >> bits) & ((1 << width) - 1)
            buffer &= (1 << bits) - 1
            if code == 256:
                table, width, previous = table[:258], 9, b""
                continue
            if code == 257:
                return bytes(out), "ok"
            if code < len(table):
                entry = table[code]
                if previous and len(table) < 4096:
                    table.append(previous + entry[:1])
            elif code == len(table) and previous and len(table) < 4096:
                entry = previous + previous[:1]
                table.append(entry)
            else:
                return bytes(out), "corrupt: LZW code out of range"
            out += entry
            previous = entry
            if len(table) + early >= (1 << width) and width < 12:
                width += 1
            if len(out) > cap:
                raise _Stop("cap")
        if len(out) > RATIO_MIN_BYTES and len(out) > max_ratio * pos:
            raise _Stop("ratio")
    return bytes(out), "truncated"


_STAGES = {b"FlateDecode": _flate, b"ASCIIHexDecode": _ascii_hex, b"ASCII85Decode": _ascii85,
           b"RunLengthDecode": _run_length, b"LZWDecode": _lzw}


def _unpredict(data: bytes, parm: dict[bytes, int]) -> bytes:
    """Undo a TIFF (2) or PNG (10-15) predictor, as /DecodeParms asks."""
    predictor = parm.get(b"Predictor", 1)
    colors = max(1, min(parm.get(b"Colors", 1), 32))
    bpc = parm.get(b"BitsPerComponent", 8)
    columns = max(1, min(parm.get(b"Columns", 1), 1 << 20))
    if bpc not in (1, 2, 4, 8, 16):
        raise ValueError(f"BitsPerComponent {bpc}")
    pixel = max(1, colors * bpc // 8)
    row = (colors * bpc * columns + 7) // 8
    if predictor == 2:
        if bpc != 8:
            return data        # sub-byte TIFF prediction: rare; the undecoded rows are kept
        out = bytearray(data)
        for start in range(0, len(out), row):
            for i in range(start + pixel, min(start + row, len(out))):
                out[i] = (out[i] + out[i - pixel]) & 0xFF
        return bytes(out)
    out = bytearray()
    prior = bytes(row)
    for start in range(0, len(data), row + 1):
        kind, line = data[start], bytearray(data[start + 1:start + 1 + row])
        if kind == 1:
            for i in range(pixel, len(line)):
                line[i] = (line[i] + line[i - pixel]) & 0xFF
        elif kind == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prior[:len(line)], strict=True))
        elif kind == 3:
            for i in range(len(line)):
                left = line[i - pixel] if i >= pixel else 0
                line[i] = (line[i] + ((left + prior[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(len(line)):
                a = line[i - pixel] if i >= pixel else 0
                b = prior[i]
                c = prior[i - pixel] if i >= pixel else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        elif kind != 0:
            raise ValueError(f"PNG predictor row type {kind}")
        out += line
        prior = bytes(line) + bytes(row - len(line))
    return bytes(out)


# --- finding streams -----------------------------------------------------------------------------------

def _streams(data: bytes) -> Iterator[tuple[int, int]]:
    """(offset of each "stream" keyword, offset of its data): the keyword on its own, not "endstream",
    followed by an end of line. A plain search is much faster here than a regular expression, and polyglot.find
    releases the GIL on big buffers (bytes.find held it for ~8 ms per 10 MB: the 2-thread row, issue 21)."""
    pos = find(data, b"stream")
    while pos >= 0:
        after = pos + 6
        if pos == 0 or not data[pos - 1:pos].isalpha():
            if data[after:after + 2] == b"\r\n":
                yield pos, after + 2
            elif data[after:after + 1] in (b"\n", b"\r"):
                yield pos, after + 1
        pos = find(data, b"stream", after)


def _stream_end(data: bytes, start: int, dictionary: bytes) -> int | None:
    """Where the stream's data ends: its direct /Length when "endstream" follows it, else the next
    "endstream" keyword."""
    length = _LENGTH.search(dictionary)
    if length:
        end = start + int(length.group(1))
        if data[end:end + 12].lstrip(b"\r\n ").startswith(b"endstream"):
            return end
    end = find(data, b"endstream", start)
    if end < 0:
        return None
    while end > start and data[end - 1] in b"\r\n":
        end -= 1
    return end
