"""A file shared with our user by link and fetched over HTTP (an XMPP link, a Yahoo relay or peer download): how
the download is named, in whose context it is decided and what our user is told when it is stopped. One place for
both carriers: the gateway's HTTP side (imguard/gateway/http_uploads.py) and the replay (imguard/replay/http.py),
so a verdict offline is described as the verdict inline."""

from __future__ import annotations

from typing import Any

from imguard.files.expected import ExpectedDownload
from imguard.files.tracker import inbound_text
from imguard.model import FROM_SERVER, ChatContext, Decision


def is_link(expected: Any) -> bool:
    """An XMPP link the server delivered (XEP-0066 OOB, an XEP-0363 GET URL in a Jingle offer); else a Yahoo
    transfer (imguard.protocols.ymsg.YmsgTransfer)."""
    return isinstance(expected, ExpectedDownload)


def mechanism(expected: Any) -> str:
    return (expected.context.transfer_mechanism or "xep-0363-get") if is_link(expected) else "download"


def context(expected: Any, **addresses: str) -> ChatContext:
    """The context the chat session gave the file (the party who shared it to our user), as an inbound file:
    origin FROM_SERVER, with the HTTP connection's `addresses` (client_address, server_address, connection_id)
    where given."""
    return expected.context.with_(transfer_mechanism=mechanism(expected), origin=FROM_SERVER, **addresses)


def receiver_notice(expected: Any, name: str, decision: Decision) -> str:
    """What our user, who fetched it, is told on the chat connection that announced it: an XMPP user in the
    tracker's words for an inbound file; a Yahoo user in Yahoo's (the rule's notice, else a sentence)."""
    if is_link(expected):
        return inbound_text(name, expected.context.sender, decision)
    return decision.notice or f"The file {name} sent to you was blocked: {decision.refusal}"
