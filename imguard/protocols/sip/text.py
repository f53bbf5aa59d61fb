"""Chat bodies shared by SIP MESSAGE and MSRP: which are text, how a masked text is written back, and the
command collector both sessions use. Pure.
"""

from __future__ import annotations

from imguard.protocols.base import Command, Send
from imguard.protocols.sip.message import decode_text, html_to_text, parse_cpim

# Bodies that carry no words of the user: composing indications (RFC 3994), delivery notifications (RFC 5438).
UNCHECKED_TYPES = ("application/im-iscomposing+xml", "message/imdn+xml", "message/delivery-status")


class Out:
    """Commands being collected; consecutive Sends in one direction become one Send (not for datagrams)."""

    def __init__(self, merge: bool = True):
        self.merge = merge
        self._cmds: list[Command] = []
        self._parts: list[bytes] = []
        self._to_client: bool | None = None

    def send(self, to_client: bool, data: bytes) -> None:
        if not data:
            return
        if not self.merge:
            self._cmds.append(Send(to_client=to_client, data=data))
            return
        if self._to_client is not None and self._to_client != to_client:
            self._flush()
        self._to_client = to_client
        self._parts.append(data)

    def add(self, *cmds: Command | None) -> None:
        for c in cmds:
            if c is None:
                continue
            if isinstance(c, Send):
                self.send(c.to_client, c.data)
            else:
                self._flush()
                self._cmds.append(c)

    def _flush(self) -> None:
        if self._parts:
            self._cmds.append(Send(to_client=bool(self._to_client), data=b"".join(self._parts)))
        self._parts = []
        self._to_client = None

    @property
    def cmds(self) -> list[Command]:
        self._flush()
        return self._cmds


def message_text(content_type: str, params: dict[str, str], body: bytes) -> tuple[str, str] | None:
    """(text for policy, kind) of a text body: kind "plain", "html"; None when it is not text."""
    if content_type == "text/plain":
        return decode_text(body, params.get("charset", "")), "plain"
    if content_type == "text/html":
        return html_to_text(decode_text(body, params.get("charset", ""))), "html"
    return None


def masked_body(content_type: str, params: dict[str, str], body: bytes, masked: str) -> tuple[bytes, str | None]:
    """(new body, new Content-Type or None to keep it) for a masked text body; also inside message/cpim."""
    if content_type == "message/cpim":
        cpim = parse_cpim(body)
        inner_type, inner_params = cpim.content_type
        new, new_type = masked_body(inner_type, inner_params, cpim.content, masked)
        return cpim.with_content(new, new_type), None
    charset = params.get("charset", "") if content_type == "text/plain" else ""
    try:
        data = masked.encode(charset or "utf-8")
    except (LookupError, UnicodeEncodeError):
        data, charset = masked.encode("utf-8"), ""
    if content_type == "text/html" or (params.get("charset") and not charset):
        return data, "text/plain;charset=UTF-8"
    return data, None
