"""File offers on one XMPP connection: what an XEP-0096 SI or XEP-0234 Jingle offer says about a file, and the files
a message or offer shares by link.

A client offers a file (name, size, hash, media type) before it sends it by an in-band bytestream (XEP-0047),
a SOCKS5 bytestream (XEP-0065) or a Jingle transport; the transfer itself carries only a sid. `FileOffers`
remembers each offer under its sid (the SI id, the Jingle session id and every transport sid of the content)
in the connection's bounded, expiring table, so the transfer that follows is inspected and recorded under the
file's name.

A file shared by link (usually an XEP-0363 upload's GET URL) is named by `shared_files`: an XEP-0066 `jabber:x:oob`
element (what Conversations, Dino and Gajim attach to the message whose body is the URL) or an XEP-0447
`<file-sharing>` with its XEP-0446 metadata and XEP-0103 url-data sources; `jingle_shared_files` finds the same
in an XEP-0234 Jingle file offer (url-data or an OOB URL in the content). The session registers these links as
expected downloads when they come *to* its client, so the gateway's HTTP side holds and scans their GET.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit
from xml.etree import ElementTree as ET

from imguard.files.expected import ExpectedTransfers
from imguard.protocols.xmpp.xmlutil import child, children, split

NS_SI = "http://jabber.org/protocol/si"
NS_SI_FT = "http://jabber.org/protocol/si/profile/file-transfer"
NS_JINGLE = "urn:xmpp:jingle:1"
NS_JINGLE_FT = "urn:xmpp:jingle:apps:file-transfer:"     # prefix: :3, :4, :5

NS_OOB_X = "jabber:x:oob"                                # XEP-0066
NS_URL_DATA = "http://jabber.org/protocol/url-data"     # XEP-0103
NS_SFS = "urn:xmpp:sfs:0"                                # XEP-0447 stateless file sharing
NS_FILE_METADATA = "urn:xmpp:file:metadata:0"            # XEP-0446

OFFER_KIND = "offer"     # the table's kind: sid -> FileOffer
# URL schemes of a file a client downloads over HTTP (aesgcm://: XEP-0454, an https GET with the key in the fragment)
FILE_URL_SCHEMES = frozenset({"http", "https", "aesgcm"})


def int_or_none(value: str | None) -> int | None:
    """An integer attribute, or None when it is missing or not a number (a peer's typo is not an error)."""
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class FileOffer:
    """What an SI or Jingle offer said about a file."""
    name: str = ""
    size: int | None = None
    hash: str = ""
    content_type: str = ""


def is_file_url(url: str) -> bool:
    """A URL a client fetches over HTTP(S) to get a shared file."""
    scheme, sep, _ = url.partition(":")
    return bool(sep) and scheme.lower() in FILE_URL_SCHEMES


def url_name(url: str) -> str:
    """The file name a download URL ends in (XEP-0363 GET URLs end in the uploaded file's name)."""
    try:
        return unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    except ValueError:
        return ""


def _sub(el: ET.Element, ns: str, name: str) -> str:
    e = child(el, ns, name)
    return (e.text or "").strip() if e is not None else ""


def _metadata_offer(f: ET.Element | None, ns: str, url: str) -> FileOffer:
    """What a `<file>` (XEP-0234 or XEP-0446: name, size, media-type, hash) says, named by the URL when it has no
    name."""
    if f is None:
        return FileOffer(url_name(url))
    h = next((e for e in f if split(e.tag)[1] == "hash"), None)
    digest = f"{h.get('algo', '')}:{(h.text or '').strip()}" if h is not None else ""
    return FileOffer(_sub(f, ns, "name") or url_name(url), int_or_none(_sub(f, ns, "size") or None), digest,
                     _sub(f, ns, "media-type"))


def _link_urls(el: ET.Element) -> list[str]:
    """URLs under `el` that name a file's source: XEP-0103 url-data targets and XEP-0066 OOB urls."""
    urls = []
    for e in el.iter():
        ns, local = split(e.tag)
        if ns == NS_URL_DATA and local == "url-data" and e.get("target", "").strip():
            urls.append(e.get("target", "").strip())
        elif ns == NS_OOB_X and local == "url" and (e.text or "").strip():
            urls.append((e.text or "").strip())
    return urls


def shared_files(elements: list[ET.Element]) -> list[tuple[str, FileOffer]]:
    """The (URL, what is known of its file) a message shares: `elements` are its XEP-0066 `<x xmlns='jabber:x:oob'>`
    and XEP-0447 `<file-sharing>` children. Every URL, whatever its scheme (a link is recorded as it is)."""
    found: list[tuple[str, FileOffer]] = []
    for el in elements:
        ns, local = split(el.tag)
        if ns == NS_OOB_X:
            for u in children(el, NS_OOB_X, "url"):
                url = (u.text or "").strip()
                if url:
                    found.append((url, FileOffer(url_name(url))))
        elif ns == NS_SFS and local == "file-sharing":
            meta = child(el, NS_FILE_METADATA, "file")
            sources = child(el, NS_SFS, "sources")
            for url in _link_urls(sources) if sources is not None else ():
                found.append((url, _metadata_offer(meta, NS_FILE_METADATA, url)))
    return found


def _jingle_file(content: ET.Element) -> tuple[ET.Element | None, str]:
    """The XEP-0234 `<file>` of a Jingle content and its namespace (None when it is not a file transfer)."""
    for c in content:
        ns, local = split(c.tag)
        if local == "description" and ns.startswith(NS_JINGLE_FT):
            return child(c, ns, "file"), ns
    return None, ""


def jingle_shared_files(jingle: ET.Element) -> list[tuple[str, FileOffer]]:
    """The files a Jingle session-initiate or content-add offers by link (an XEP-0363 GET URL as an XEP-0103
    url-data source or an XEP-0066 OOB URL in the content), with the offer's name, size, hash and type."""
    if jingle.get("action") not in ("session-initiate", "content-add"):
        return []
    found: list[tuple[str, FileOffer]] = []
    for content in children(jingle, NS_JINGLE, "content"):
        f, ns = _jingle_file(content)
        if f is None:
            continue
        for url in _link_urls(content):
            found.append((url, _metadata_offer(f, ns, url)))
    return found


class FileOffers:
    """The offers this connection's client made, by sid, in the session's table (`table`, which bounds them and
    forgets them after its ttl)."""

    def __init__(self, table: ExpectedTransfers):
        self._table = table

    def get(self, sid: str) -> FileOffer:
        """The offer for `sid`, or an empty one (a transfer nobody announced has no name)."""
        return self._table.get(sid, kind=OFFER_KIND) or FileOffer()

    def remember_si(self, si: ET.Element) -> None:
        """An XEP-0096 `<si>` with the file-transfer profile."""
        f = child(si, NS_SI_FT, "file")
        if f is not None and si.get("id"):
            self._table.expect(si.get("id"), FileOffer(f.get("name", ""), int_or_none(f.get("size")),
                                                       f.get("hash", ""), si.get("mime-type", "")), kind=OFFER_KIND)

    def remember_jingle(self, jingle: ET.Element) -> None:
        """An XEP-0234 file in a Jingle session-initiate or content-add, under the session's and its transports'
        sids."""
        if jingle.get("action") not in ("session-initiate", "content-add"):
            return
        for content in children(jingle, NS_JINGLE, "content"):
            f, ns = _jingle_file(content)
            if f is None:
                continue
            offer = _metadata_offer(f, ns, "")
            sids = [jingle.get("sid", "")] + [c.get("sid", "") for c in content if split(c.tag)[1] == "transport"]
            for sid in sids:
                if sid:
                    self._table.expect(sid, offer, kind=OFFER_KIND)
