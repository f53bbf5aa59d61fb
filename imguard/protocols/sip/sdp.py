"""The MSRP parts of an SDP body (RFC 4566, RFC 4975 §8, RFC 5547). Pure.

    msrp_media(sdp_text) -> [MsrpMedia(port=7654, tls=False, path=("msrp://a.example:7654/jshA7weztas;tcp",),
                                       file=FileSelector(name="My cool picture.jpg", ...), direction="sendonly")]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from imguard.protocols.framing import is_number
from imguard.protocols.msrp.offer import FileSelector

MSRP_PROTOCOLS = {"TCP/MSRP": False, "TCP/TLS/MSRP": True}
DIRECTIONS = ("sendonly", "recvonly", "sendrecv", "inactive")


class SdpError(ValueError):
    """A malformed MSRP media description (kind names the anomaly)."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class MsrpMedia:
    port: int
    tls: bool
    path: tuple[str, ...]
    accept_types: tuple[str, ...] = ()
    file: FileSelector | None = None
    direction: str = "sendrecv"
    file_transfer_id: str = ""
    setup: str = ""                     # RFC 6135 a=setup (active/passive/actpass), "" = RFC 4975 default
    address: str = ""                   # the c= connection address (media level, else session level)


_SELECTOR = re.compile(r'(name|type|size|hash):("(?:[^"\\]|\\.)*"|\S+)')


def parse_file_selector(value: str) -> FileSelector:
    """RFC 5547 §5: `name:"My cool picture.jpg" type:image/jpeg size:32349 hash:sha-1:72:24:...`."""
    fields: dict[str, str] = {}
    for key, raw in _SELECTOR.findall(value):
        if raw.startswith('"'):
            raw = raw[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        fields.setdefault(key, raw)
    size = None
    if "size" in fields:
        if not is_number(fields["size"]):
            raise SdpError("sdp_bad_file_selector", f"file-selector size {fields['size']!r}")
        size = int(fields["size"])
    return FileSelector(name=fields.get("name", ""), type=fields.get("type", ""), size=size,
                        hash=fields.get("hash", ""))


def msrp_media(sdp: str) -> list[MsrpMedia]:
    """Every `m=message` stream with an MSRP protocol in the SDP; session-level a=sendonly etc. apply to all."""
    media: list[dict] = []
    session_direction = "sendrecv"
    session_address = ""
    current: dict | None = None
    for line in sdp.replace("\r\n", "\n").split("\n"):
        line = line.strip()
        if len(line) < 2 or line[1] != "=":
            continue
        kind, value = line[0], line[2:]
        if kind == "m":
            parts = value.split()
            if len(parts) >= 3 and parts[0] == "message" and parts[2].upper() in MSRP_PROTOCOLS:
                port_text = parts[1].split("/", 1)[0]
                if not is_number(port_text) or int(port_text) > 65535:
                    raise SdpError("sdp_bad_port", f"m=message port {parts[1]!r}")
                current = {"port": int(port_text), "tls": MSRP_PROTOCOLS[parts[2].upper()], "path": (),
                           "accept_types": (), "file": None, "direction": None, "file_transfer_id": "",
                           "setup": "", "address": ""}
                media.append(current)
            else:
                current = {"ignored": True}     # another stream (audio, non-MSRP message): its attributes are not ours
            continue
        if kind == "c":
            parts = value.split()
            address = parts[2].split("/", 1)[0] if len(parts) >= 3 and parts[0] == "IN" else ""
            if current is None:
                session_address = address
            elif current is not None and "ignored" not in current:
                current["address"] = address
            continue
        if kind != "a" or (current is not None and "ignored" in current):
            continue
        name, _, attr = value.partition(":")
        name = name.strip().lower()
        if current is None:             # session level (before any m= line)
            if name in DIRECTIONS:
                session_direction = name
            continue
        if name == "path":
            current["path"] = tuple(attr.split())
        elif name == "accept-types":
            current["accept_types"] = tuple(attr.split())
        elif name == "file-selector":
            current["file"] = parse_file_selector(attr)
        elif name == "file-transfer-id":
            current["file_transfer_id"] = attr.strip()
        elif name == "setup":
            current["setup"] = attr.strip().lower()
        elif name in DIRECTIONS:
            current["direction"] = name
    out = []
    for m in media:
        if not m["path"]:
            raise SdpError("sdp_missing_path", "an MSRP media line without a=path")
        m["direction"] = m["direction"] or session_direction
        m["address"] = m["address"] or session_address
        out.append(MsrpMedia(**m))
    return out
