"""File offers on one XMPP connection: what an XEP-0096 SI or XEP-0234 Jingle offer says about a file.

A client offers a file (name, size, hash, media type) before it sends it by an in-band bytestream (XEP-0047),
a SOCKS5 bytestream (XEP-0065) or a Jingle transport; the transfer itself carries only a sid. `FileOffers`
remembers each offer under its sid (the SI id, the Jingle session id and every transport sid of the content)
in the connection's bounded, expiring table, so the transfer that follows is inspected and recorded under the
file's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.etree import ElementTree as ET

from imguard.files.expected import ExpectedTransfers
from imguard.protocols.xmpp.xmlutil import child, children, split

NS_SI = "http://jabber.org/protocol/si"
NS_SI_FT = "http://jabber.org/protocol/si/profile/file-transfer"
NS_JINGLE = "urn:xmpp:jingle:1"
NS_JINGLE_FT = "urn:xmpp:jingle:apps:file-transfer:"     # prefix: :3, :4, :5

OFFER_KIND = "offer"     # the table's kind: sid -> FileOffer


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
            offer = None
            sids = [jingle.get("sid", "")]
            for c in content:
                ns, local = split(c.tag)
                if local == "description" and ns.startswith(NS_JINGLE_FT):
                    f = child(c, ns, "file")
                    if f is not None:
                        def sub(name: str, f=f, ns=ns) -> str:
                            e = child(f, ns, name)
                            return (e.text or "").strip() if e is not None else ""
                        h = next((e for e in f if split(e.tag)[1] == "hash"), None)
                        offer = FileOffer(sub("name"), int_or_none(sub("size") or None),
                                          f"{h.get('algo', '')}:{(h.text or '').strip()}" if h is not None else "",
                                          sub("media-type"))
                elif local == "transport" and c.get("sid"):
                    sids.append(c.get("sid"))
            if offer is not None:
                for sid in sids:
                    if sid:
                        self._table.expect(sid, offer, kind=OFFER_KIND)
