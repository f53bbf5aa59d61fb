"""Erlang's external term format (ETF, version 131), the subset Discord's gateway speaks with encoding=etf (the
desktop client's erlpack): maps, lists, tuples, binaries, atoms, integers, floats. Pure, no I/O.

    tree = decode(data)        # JSON-like: atoms nil/true/false -> None/True/False, other atoms and binaries -> str,
                               # tuples -> lists, integers (snowflakes are 64-bit) -> int; BodyError when unreadable
    data = encode(tree)        # map keys as atoms, strings as binaries: what erlpack on the client reads back

A decoded payload is handed to the JSON decoders as JSON (the carrier's one path); only a payload imguard changed is
encoded again (erlpack reads an atom and a binary alike as a string, so the client sees the same values). Bounded:
nesting deeper than `max_depth` and lengths past the end of the data are BodyError, never a crash or a big
allocation; a compressed term (tag 80) inflates to at most `max_size`.
"""

from __future__ import annotations

import struct
import zlib

from imguard.protocols.httpchat.bodies import BodyError

VERSION = 131
SMALL_INTEGER, INTEGER, FLOAT, NEW_FLOAT = 97, 98, 99, 70
ATOM, SMALL_ATOM, ATOM_UTF8, SMALL_ATOM_UTF8 = 100, 115, 118, 119
SMALL_TUPLE, LARGE_TUPLE, NIL, STRING, LIST, BINARY, MAP = 104, 105, 106, 107, 108, 109, 116
SMALL_BIG, LARGE_BIG, COMPRESSED = 110, 111, 80
ATOMS = {"nil": None, "true": True, "false": False}


def _key(key: object) -> str:
    """A map key as JSON has it: a string (atoms nil/true/false and numbers spelled out)."""
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool):
        return {None: "nil", True: "true", False: "false"}[key]
    return str(key)


_U16, _U32 = struct.Struct(">H").unpack_from, struct.Struct(">I").unpack_from
_I32, _F64 = struct.Struct(">i").unpack_from, struct.Struct(">d").unpack_from


def _terms(data: bytes, max_depth: int):
    """The term reader over `data`: term(position, depth) -> (value, next position). Positions are checked
    against the end before each read (struct.error and IndexError never escape as such)."""
    size = len(data)

    def need(end: int, at: int) -> None:
        if end > size:
            raise BodyError(f"an ETF term runs past the end of the data (at byte {at})")

    def term(i: int, depth: int):
        if depth > max_depth:
            raise BodyError(f"ETF nested deeper than {max_depth} levels")
        need(i + 1, i)
        tag = data[i]
        if tag == SMALL_INTEGER:
            need(i + 2, i)
            return data[i + 1], i + 2
        if tag == INTEGER:
            need(i + 5, i)
            return _I32(data, i + 1)[0], i + 5
        if tag == BINARY:
            need(i + 5, i)
            end = i + 5 + _U32(data, i + 1)[0]
            need(end, i)
            try:
                return data[i + 5:end].decode("utf-8"), end
            except UnicodeDecodeError:
                raise BodyError("an ETF binary that is not UTF-8 text") from None
        if tag == MAP:
            need(i + 5, i)
            out, i = {}, i + 5
            for _ in range(_U32(data, i - 4)[0]):
                key, i = term(i, depth + 1)
                if isinstance(key, (list, dict)):
                    raise BodyError("an ETF map key that is not a scalar")
                out[_key(key)], i = term(i, depth + 1)
            return out, i
        if tag in (SMALL_ATOM_UTF8, SMALL_ATOM, ATOM_UTF8, ATOM):
            wide = tag in (ATOM, ATOM_UTF8)
            need(i + (3 if wide else 2), i)
            start = i + (3 if wide else 2)
            end = start + (_U16(data, i + 1)[0] if wide else data[i + 1])
            need(end, i)
            name = data[start:end].decode("latin-1" if tag in (ATOM, SMALL_ATOM) else "utf-8", "replace")
            return ATOMS.get(name, name), end
        if tag == NIL:
            return [], i + 1
        if tag in (LIST, SMALL_TUPLE, LARGE_TUPLE):
            head = 2 if tag == SMALL_TUPLE else 5
            need(i + head, i)
            count = data[i + 1] if tag == SMALL_TUPLE else _U32(data, i + 1)[0]
            items, i = [], i + head
            for _ in range(count):
                item, i = term(i, depth + 1)
                items.append(item)
            if tag == LIST:
                tail, i = term(i, depth + 1)
                if tail != []:
                    raise BodyError("an improper ETF list")
            return items, i
        if tag in (SMALL_BIG, LARGE_BIG):
            head = 3 if tag == SMALL_BIG else 6
            need(i + head, i)
            n = data[i + 1] if tag == SMALL_BIG else _U32(data, i + 1)[0]
            end = i + head + n
            need(end, i)
            value = int.from_bytes(data[i + head:end], "little")
            return (-value if data[i + head - 1] else value), end
        if tag == NEW_FLOAT:
            need(i + 9, i)
            return _F64(data, i + 1)[0], i + 9
        if tag == STRING:                       # a list of bytes: erlpack reads it as a string
            need(i + 3, i)
            end = i + 3 + _U16(data, i + 1)[0]
            need(end, i)
            return data[i + 3:end].decode("latin-1"), end
        if tag == FLOAT:
            need(i + 32, i)
            try:
                return float(data[i + 1:i + 32].rstrip(b"\0").decode("ascii")), i + 32
            except ValueError:
                raise BodyError("an ETF float that is not a number") from None
        raise BodyError(f"an ETF term of tag {tag} (not one Discord sends)")
    return term


def decode(data: bytes, max_depth: int = 256, max_size: int = 64 << 20) -> object:
    """One ETF payload -> a JSON-like tree. Raises BodyError."""
    if data[:1] != bytes([VERSION]):
        raise BodyError("not an ETF payload (no version byte 131)")
    if data[1:2] == bytes([COMPRESSED]):
        if len(data) < 6:
            raise BodyError("a compressed ETF term cut short")
        size = _U32(data, 2)[0]
        if size > max_size:
            raise BodyError(f"a compressed ETF term of {size} bytes (the limit is {max_size})")
        inflater = zlib.decompressobj()
        try:
            inner = inflater.decompress(data[6:], size + 1)
        except zlib.error as e:
            raise BodyError(f"a compressed ETF term that cannot be inflated ({e})") from None
        if len(inner) != size:
            raise BodyError("a compressed ETF term whose size is not the one announced")
        data, start = inner, 0
    else:
        start = 1
    try:
        tree, end = _terms(data, max_depth)(start, 0)
    except RecursionError:
        raise BodyError("ETF nested too deep") from None
    if end != len(data):
        raise BodyError("bytes after the ETF term")
    return tree


def _atom(name: str) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) < 256:
        return struct.pack(">BB", SMALL_ATOM_UTF8, len(raw)) + raw
    return struct.pack(">BH", ATOM_UTF8, len(raw)) + raw


def _term(value: object, out: list, key: bool = False) -> None:
    if value is None or value is True or value is False:
        out.append(_atom({None: "nil", True: "true", False: "false"}[value]))
    elif isinstance(value, int):
        if 0 <= value < 256:
            out.append(struct.pack(">BB", SMALL_INTEGER, value))
        elif -2 ** 31 <= value < 2 ** 31:
            out.append(struct.pack(">Bi", INTEGER, value))
        else:
            digits = abs(value).to_bytes((abs(value).bit_length() + 7) // 8, "little")
            head = struct.pack(">BBB", SMALL_BIG, len(digits), value < 0) if len(digits) < 256 else \
                struct.pack(">BIB", LARGE_BIG, len(digits), value < 0)
            out.append(head + digits)
    elif isinstance(value, float):
        out.append(struct.pack(">Bd", NEW_FLOAT, value))
    elif isinstance(value, str):
        if key and len(value.encode("utf-8")) < 256:
            out.append(_atom(value))
        else:
            raw = value.encode("utf-8")
            out.append(struct.pack(">BI", BINARY, len(raw)) + raw)
    elif isinstance(value, (list, tuple)):
        if value:
            out.append(struct.pack(">BI", LIST, len(value)))
            for item in value:
                _term(item, out)
        out.append(bytes([NIL]))
    elif isinstance(value, dict):
        out.append(struct.pack(">BI", MAP, len(value)))
        for k, v in value.items():
            _term(k, out, key=True)
            _term(v, out)
    else:
        raise TypeError(f"no ETF for {type(value).__name__}")


def encode(tree: object) -> bytes:
    """A JSON-like tree -> one ETF payload (map keys as atoms, strings as binaries)."""
    out = [bytes([VERSION])]
    _term(tree, out)
    return b"".join(out)
