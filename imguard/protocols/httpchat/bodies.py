"""Request bodies of chat APIs: JSON (depth-bounded), form-encoded and multipart/form-data, read strictly, and
rewritten at a TextPart's locator when policy masks a text.

Hostile input is bounded: JSON nesting deeper than `max_depth` is refused before json.loads (whose recursion
would otherwise be the limit), a multipart body with more than `max_parts` parts, without its closing
boundary (an upload that stopped half-way) or with a part that has no header block is refused. Errors are
BodyError with a sentence for the client.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from itertools import accumulate
from html.parser import HTMLParser
from urllib.parse import parse_qsl, quote_plus


class BodyError(ValueError):
    """The body cannot be read as its content type says (the client's fault)."""


_ESCAPE = re.compile(rb"\\.", re.S)
_JSON_STRING = re.compile(rb'"[^"]*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256)]


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects, counted without parsing (escapes, then strings, removed; the
    brackets left summed in C: about 20 MB/s, a Discord READY or a /sync of megabytes in tens of ms)."""
    brackets = _JSON_STRING.sub(b"", _ESCAPE.sub(b"", data)).translate(None, _NOT_BRACKET)
    return max(0, max(accumulate(map(_STEP.__getitem__, brackets)), default=0))


def parse_json(data: bytes, max_depth: int) -> object:
    if json_depth(data) > max_depth:
        raise BodyError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise BodyError("the JSON body is not UTF-8") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise BodyError(f"malformed JSON: {e}") from None


def parse_form(data: bytes) -> list[tuple[str, str]]:
    try:
        return parse_qsl(data.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(data.strip()))
    except (UnicodeDecodeError, ValueError) as e:
        raise BodyError(f"malformed form body: {e}") from None


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None        # None: a plain field, not a file
    content_type: str
    start: int                  # the content's span in the body (for rewriting)
    end: int
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


def boundary_of(content_type_header: str) -> str:
    m = re.search(r'boundary=(?:"([^"]+)"|([^;\s]+))', content_type_header, re.I)
    if not m:
        raise BodyError("multipart body without a boundary parameter")
    boundary = m.group(1) or m.group(2)
    if not 1 <= len(boundary) <= 70:
        raise BodyError("multipart boundary longer than 70 characters (RFC 2046)")
    return boundary


def _disposition(value: str) -> tuple[str, str | None]:
    params: dict[str, str] = {}
    for m in re.finditer(r';\s*([\w*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))', value):
        key = m.group(1).lower()
        val = m.group(2) if m.group(2) is not None else m.group(3).strip()
        if key == "filename*":
            _, _, encoded = val.partition("''")
            from urllib.parse import unquote
            params["filename"] = unquote(encoded or val)
        elif key not in params:
            params[key] = val.replace('\\"', '"')
    return params.get("name", ""), params.get("filename")


def parse_multipart(data: bytes, content_type_header: str, max_parts: int = 100) -> list[Part]:
    """The parts of a multipart/form-data body; refuses a body that does not end with its closing boundary."""
    delimiter = b"--" + boundary_of(content_type_header).encode("latin-1")
    pos = data.find(delimiter)
    if pos < 0 or data[:pos].strip(b"\r\n") :
        raise BodyError("multipart body does not start with its boundary")
    parts: list[Part] = []
    pos += len(delimiter)
    while True:
        if data[pos:pos + 2] == b"--":
            return parts                                    # the closing delimiter (an epilogue is ignored)
        if data[pos:pos + 2] != b"\r\n":
            raise BodyError("multipart boundary not followed by CRLF")
        head_end = data.find(b"\r\n\r\n", pos + 2)
        if head_end < 0:
            if data.find(b"\r\n", pos + 2) == pos + 2:       # a part without headers: CRLF CRLF right away
                head_end = pos
            else:
                raise BodyError("multipart part without a header block (the body ends inside it)")
        headers = {}
        for line in data[pos + 2:head_end].split(b"\r\n"):
            if not line:
                continue
            key, sep, value = line.partition(b":")
            if not sep:
                raise BodyError(f"malformed multipart header line {line[:60]!r}")
            headers[key.strip().lower().decode("latin-1")] = value.strip().decode("utf-8", "replace")
        start = head_end + 4
        end = data.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise BodyError("multipart body ends without its closing boundary (truncated upload?)")
        name, filename = _disposition(headers.get("content-disposition", ""))
        parts.append(Part(name, filename, headers.get("content-type", "").split(";")[0].strip().lower(),
                          start, end, data[start:end]))
        if len(parts) > max_parts:
            raise BodyError(f"more than {max_parts} multipart parts")
        pos = end + 2 + len(delimiter)


# --- text -------------------------------------------------------------------------------------------------

class _Stripper(HTMLParser):
    BREAKS = {"br", "p", "div", "li", "tr", "blockquote", "pre", "h1", "h2", "h3", "h4", "h5", "h6"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "mx-reply"):
            self.skip += 1
        elif tag in self.BREAKS and self.out:
            self.out.append("\n")
        for key, value in attrs:            # a link's target is text the reader can follow
            if key == "href" and value and not self.skip:
                self.out.append(f" {value} ")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "mx-reply") and self.skip:
            self.skip -= 1

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data)


def strip_html(text: str) -> str:
    """The readable text of an HTML fragment (tags dropped, entities decoded, link targets kept)."""
    parser = _Stripper()
    try:
        parser.feed(text)
        parser.close()
    except Exception:           # HTMLParser is lenient; never let a fragment break decoding
        return re.sub(r"<[^>]*>", " ", text)
    return "".join(parser.out).strip()


def strings_under(obj: object, keys: frozenset[str], path: tuple = (), depth: int = 0) -> list[tuple[tuple, str]]:
    """(path, string) for every string value whose key is in `keys`, anywhere in a JSON value (Slack blocks,
    Discord embeds, attachments)."""
    found: list[tuple[tuple, str]] = []
    if depth > 200:
        return found
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str) and k in keys and v:
                found.append((path + (k,), v))
            elif isinstance(v, (dict, list)):
                found.extend(strings_under(v, keys, path + (k,), depth + 1))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if isinstance(v, (dict, list)):
                found.extend(strings_under(v, keys, path + (i,), depth + 1))
    return found


# --- rewriting --------------------------------------------------------------------------------------------

def _set_in(obj: object, path: tuple, value: str) -> None:
    for key in path[:-1]:
        obj = obj[key]          # type: ignore[index]
    obj[path[-1]] = value       # type: ignore[index]


def _dump(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def rewrite(body: bytes, content_type_header: str, replacements: list[tuple[tuple, str]],
            max_depth: int = 10_000) -> bytes:
    """`body` with each (locator, new text) applied. Raises BodyError when a locator does not fit the body."""
    unknown = sorted({str(loc[0]) for loc, _ in replacements if loc[0] not in ("json", "form", "multipart", "xml")})
    if unknown:                 # never forward a body unchanged that was to be masked
        raise BodyError(f"cannot rewrite a {', '.join(unknown)} body")
    for loc, text in replacements:
        if loc[0] == "xml":
            body = _rewrite_xml_mime(body, loc[1], text)
    try:
        json_changes = [(loc[1:], text) for loc, text in replacements if loc[0] == "json"]
        form_changes = {loc[1]: text for loc, text in replacements if loc[0] == "form"}
        part_changes: dict[int, list] = {}
        for loc, text in replacements:
            if loc[0] == "multipart":
                part_changes.setdefault(loc[1], []).append((loc[2:], text))
        if json_changes:
            obj = parse_json(body, max_depth)
            for path, text in json_changes:
                _set_in(obj, path, text)
            body = _dump(obj)
        if form_changes:
            fields = parse_form(body)
            body = "&".join(f"{quote_plus(k)}={quote_plus(form_changes.get(k, v))}" for k, v in fields).encode()
        if part_changes:
            parts = parse_multipart(body, content_type_header, max_parts=10_000)
            out, pos = [], 0
            for index in sorted(part_changes):
                part = parts[index]
                data = part.data
                for path, text in part_changes[index]:
                    if path and path[0] == "json":
                        obj = parse_json(data, max_depth)
                        _set_in(obj, path[1:], text)
                        data = _dump(obj)
                    else:
                        data = text.encode("utf-8")
                out += [body[pos:part.start], data]
                pos = part.end
            out.append(body[pos:])
            body = b"".join(out)
        return body
    except (KeyError, IndexError, TypeError) as e:
        raise BodyError(f"cannot rewrite the body: {e!r}") from None


def _rewrite_xml_mime(body: bytes, element: str, text: str) -> bytes:
    """The body with the MIME entity inside the (one) XML element named `element` (any prefix) given `text` as
    its body, its headers kept: the locator ("xml", element) (RVP's mime-data). A CDATA section is replaced by
    escaped text. Raises BodyError when there is not exactly one such element."""
    name = re.escape(element.encode())
    found = list(re.finditer(rb"<((?:[\w.-]+:)?" + name + rb")(\s[^>]*)?>(.*?)</\1\s*>", body, re.S))
    if len(found) != 1:
        raise BodyError(f"cannot rewrite the {element} element ({len(found)} found)")
    match = found[0]
    content = match.group(3)
    if content.lstrip().startswith(b"<![CDATA[") and content.rstrip().endswith(b"]]>"):
        content = html.escape(content.strip()[9:-3].decode("utf-8", "replace"), quote=False).encode()
    split = re.search(rb"\r?\n\r?\n", content)
    if split is None:
        raise BodyError(f"the {element} element holds no MIME body")
    new = content[:split.end()] + html.escape(text, quote=False).encode("utf-8")
    return body[:match.start(3)] + new + body[match.end(3):]


def masked_replacements(parts, masked_text: str) -> list[tuple[tuple, str]]:
    """(locator, new text) for a message whose joined text policy masked: each part gets its own masked piece;
    when the pieces cannot be told apart (a mask span crossed a separator) every part gets the whole masked
    text. An HTML part gets escaped plain text (its markup would otherwise still show the original)."""
    from imguard.protocols.httpchat.events import PART_SEPARATOR
    pieces = masked_text.split(PART_SEPARATOR)
    if len(pieces) != len(parts):
        pieces = [masked_text.replace(PART_SEPARATOR, "\n")] * len(parts)
    return [(p.locator, html.escape(piece, quote=False) if p.html else piece)
            for p, piece in zip(parts, pieces, strict=True)]
