"""Chat bodies shared by SIP MESSAGE and MSRP: which are text and how a masked text is written back. Pure."""

from __future__ import annotations

from imguard.protocols.framing import text_encoding
from imguard.protocols.sip.message import decode_text, html_to_text, parse_cpim

# Bodies that carry no words of the user: composing indications (RFC 3994), delivery notifications (RFC 5438).
UNCHECKED_TYPES = ("application/im-iscomposing+xml", "message/imdn+xml", "message/delivery-status")


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
    encoding = text_encoding(charset) if charset else "utf-8"
    try:
        data = masked.encode(encoding) if encoding else None
    except ValueError:                  # UnicodeEncodeError, and what odd codecs raise
        data = None
    if data is None:                    # a charset that is no text encoding (a NUL, base64) or cannot carry it
        data, charset = masked.encode("utf-8"), ""
    if content_type == "text/html" or (params.get("charset") and not charset):
        return data, "text/plain;charset=UTF-8"
    return data, None
