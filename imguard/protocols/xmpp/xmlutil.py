"""Small XML helpers for building and rewriting stanzas the way RFC 6120 wants them written.

ElementTree's own serializer invents `ns0:` prefixes, which RFC 6120 §4.8.3 forbids for the
content namespace; `serialize()` writes default-namespace declarations instead, only where an
element's namespace differs from its parent's, so a rewritten stanza looks like a client wrote it.
"""

from __future__ import annotations

from typing import Iterator
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape

XML_NS = "http://www.w3.org/XML/1998/namespace"


def split(tag: str) -> tuple[str, str]:
    """'{ns}local' -> ('ns', 'local'); 'local' -> ('', 'local')."""
    if tag.startswith("{"):
        ns, _, local = tag[1:].partition("}")
        return ns, local
    return "", tag


def children(el: ET.Element, ns: str, local: str) -> Iterator[ET.Element]:
    for c in el:
        if split(c.tag) == (ns, local):
            yield c


def child(el: ET.Element, ns: str, local: str) -> ET.Element | None:
    return next(children(el, ns, local), None)


def attr(value: str) -> str:
    """An attribute value in single quotes, escaped."""
    return "'" + escape(value, {"'": "&apos;", '"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"}) + "'"


def text(value: str) -> str:
    return escape(value)


def serialize(el: ET.Element, parent_ns: str) -> bytes:
    return "".join(_serialize(el, parent_ns)).encode("utf-8")


def _serialize(el: ET.Element, parent_ns: str) -> Iterator[str]:
    ns, local = split(el.tag)
    yield "<" + local
    if ns != parent_ns:
        yield " xmlns=" + attr(ns)
    prefixes: dict[str, str] = {}
    for key, value in el.attrib.items():
        ans, alocal = split(key)
        if not ans:
            name = alocal
        elif ans == XML_NS:
            name = "xml:" + alocal
        else:
            name = prefixes.setdefault(ans, f"ns{len(prefixes)}") + ":" + alocal
        yield f" {name}={attr(value)}"
    for ans, prefix in prefixes.items():
        yield f" xmlns:{prefix}={attr(ans)}"
    if not len(el) and not el.text:
        yield "/>"
    else:
        yield ">"
        if el.text:
            yield text(el.text)
        for c in el:
            yield from _serialize(c, ns)
            if c.tail:
                yield text(c.tail)
        yield f"</{local}>"
