"""The expected MSRP session: what a SIP INVITE/SDP announced, waiting for its MSRP connection.

A SipSession that sees an INVITE (or its 2xx answer) whose SDP has `m=message PORT TCP/MSRP *` stores an
`MsrpOffer` in the shared ExpectedTransfers table, kind "msrp", under two kinds of keys:

- `path_key(uri)`: "host:port/session-id" of each endpoint URI of `a=path` (the offer's and the answer's).
  An MsrpSession looks its messages up by the URIs of To-Path/From-Path, so it finds its session even on a
  connection the carrier could not attribute (a relay, connection reuse, port 2855);
- `(host, port)`: where an endpoint listens (the last URI of its a=path, and the SDP's c= address with the
  m= port, which is where clients that put a host name in a=path really listen). The carrier looks a new connection
  up by its destination with `find_msrp_offer(transfers, host, port)` to know it is MSRP (and TLS or not).

RFC 4975 §5.4: the offerer connects to the answerer's path (RFC 6135 `a=setup` can turn this around), so
both endpoints are registered. RFC 5547 file transfer: `a=file-selector` (name, type, size, hash) with
`a=sendonly` in the offer means the offerer pushes the file, `a=recvonly` that it pulls it from the answerer.
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote

from imguard.model import ChatContext
from imguard.protocols.framing import is_number

MSRP_KIND = "msrp"              # ExpectedTransfers kind; keys: path_key(uri) strings and (host, port) tuples

_ids = itertools.count(1)


def new_offer_id(prefix: str = "") -> str:
    return f"{prefix or 'msrp'}-{next(_ids)}"


@dataclass(frozen=True)
class MsrpUri:
    """msrp://host:port/session-id;transport (RFC 4975 §6)."""
    scheme: str         # "msrp" or "msrps"
    host: str
    port: int
    session_id: str
    transport: str = "tcp"

    @property
    def key(self) -> str:
        return f"{self.host}:{self.port}/{self.session_id}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/{self.session_id};{self.transport}"


def parse_msrp_uri(text: str) -> MsrpUri | None:
    """An MSRP URI, or None when it is not one (no exception: URIs come from the wire)."""
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("msrp", "msrps"):
        return None
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = authority.rsplit("@", 1)[1]
    if authority.startswith("["):
        host, _, port_text = authority[1:].partition("]")
        port_text = port_text.lstrip(":")
    else:
        host, _, port_text = authority.partition(":")
    session_id, _, transport = path.partition(";")
    if not host or not is_number(port_text) or not 0 < int(port_text) < 65536:
        return None
    if not slash or not session_id:
        return None
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = host.lower()
    return MsrpUri(scheme, host, int(port_text), unquote(session_id), (transport or "tcp").lower())


def path_key(uri: str | MsrpUri) -> str:
    """The table key of one endpoint URI: "host:port/session-id" (scheme and transport ignored)."""
    parsed = uri if isinstance(uri, MsrpUri) else parse_msrp_uri(uri)
    return parsed.key if parsed is not None else str(uri)


@dataclass(frozen=True)
class FileSelector:
    """RFC 5547 §5 `a=file-selector:name:"x" type:... size:N hash:sha-1:..` (all optional)."""
    name: str = ""
    type: str = ""
    size: int | None = None
    hash: str = ""              # "sha-1:72:24:..."


@dataclass(frozen=True)
class MsrpOffer:
    """One MSRP media stream negotiated over SIP, as the carrier and the MSRP session need it."""

    offer_id: str
    call_id: str
    offerer: str                        # identity of the INVITE's sender (P-Asserted-Identity, else From)
    answerer: str                       # identity of the INVITE's receiver (To)
    offer_path: tuple[str, ...] = ()    # the offerer's a=path (endpoint URI last)
    answer_path: tuple[str, ...] = ()   # the answerer's a=path, once the 2xx came
    tls: bool = False                   # TCP/TLS/MSRP
    accept_types: tuple[str, ...] = ()
    file: FileSelector | None = None    # RFC 5547 file transfer (None: a chat session)
    file_direction: str = ""            # "push": the offerer sends the file (sendonly), "pull": the answerer does
    file_transfer_id: str = ""
    outbound: bool = True               # offered by the gateway's own client (False: offered to it)
    addresses: tuple[tuple[str, int], ...] = ()     # (c= address, m= port) of offer and answer, also keys
    context: ChatContext = field(default_factory=ChatContext)   # connection_id = the SIP connection

    @property
    def is_file_transfer(self) -> bool:
        return self.file is not None

    @property
    def file_sender(self) -> str:
        return self.answerer if self.file_direction == "pull" else self.offerer

    def endpoint(self, of_offerer: bool) -> MsrpUri | None:
        path = self.offer_path if of_offerer else self.answer_path
        return parse_msrp_uri(path[-1]) if path else None

    def keys(self) -> list[Any]:
        """Every key this offer is stored under."""
        keys: list[Any] = []
        for of_offerer in (True, False):
            uri = self.endpoint(of_offerer)
            if uri is not None:
                keys += [uri.key, (uri.host, uri.port)]
        for host, port in self.addresses:
            if (host, port) not in keys:
                keys.append((host, port))
        return keys

    def who(self, to_path_last: str, from_path_last: str) -> tuple[str, str]:
        """(sender, recipient) of an MSRP request by the endpoint URIs it names."""
        dest = path_key(to_path_last)
        offerer, answerer = self.endpoint(True), self.endpoint(False)
        if answerer is not None and dest == answerer.key:
            return self.offerer, self.answerer
        if offerer is not None and dest == offerer.key:
            return self.answerer, self.offerer
        src = path_key(from_path_last)
        if offerer is not None and src == offerer.key:
            return self.offerer, self.answerer
        if answerer is not None and src == answerer.key:
            return self.answerer, self.offerer
        return from_path_last, to_path_last

    def with_answer(self, answer_path: tuple[str, ...], tls: bool | None = None,
                    address: tuple[str, int] | None = None) -> "MsrpOffer":
        addresses = self.addresses + ((address,) if address and address not in self.addresses else ())
        return replace(self, answer_path=answer_path, tls=self.tls if tls is None else tls, addresses=addresses)

    def to_dict(self) -> dict[str, Any]:
        f = self.file
        return {"id": self.offer_id, "call_id": self.call_id, "offerer": self.offerer, "answerer": self.answerer,
                "offer_path": list(self.offer_path), "answer_path": list(self.answer_path), "tls": self.tls,
                "accept_types": list(self.accept_types), "outbound": self.outbound,
                "file": None if f is None else {"name": f.name, "type": f.type, "size": f.size, "hash": f.hash,
                                                "direction": self.file_direction,
                                                "transfer_id": self.file_transfer_id}}


def remember_msrp_offer(transfers, offer: MsrpOffer, ttl: float) -> None:
    """Store the offer under all its keys (no table, e.g. offline: nothing)."""
    if transfers is None:
        return
    for key in offer.keys():
        transfers.expect(key, offer, kind=MSRP_KIND, ttl=ttl)


def find_msrp_offer(transfers, host: str, port: int) -> MsrpOffer | None:
    """For the carrier: the MSRP session announced for a new connection to host:port (left in place: RFC 4975
    lets several sessions share one connection, and the session may reconnect)."""
    if transfers is None:
        return None
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = host.lower()
    return transfers.get((host, int(port)), kind=MSRP_KIND)


def find_msrp_offer_by_uri(transfers, uri: str) -> MsrpOffer | None:
    if transfers is None:
        return None
    return transfers.get(path_key(uri), kind=MSRP_KIND)
