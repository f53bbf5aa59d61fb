"""RVP, Exchange 2000 Instant Messaging: WebDAV-style HTTP (draft-calsyn-rvp-01; its Exchange 2000 revision
draft-osborne-rvp-00, "RVP: A Presence and Instant Messaging Protocol", sections cited below as [RVP]).

Every principal is a node URL on its home server ([RVP] 4.1.2 Addressing): http://im.example.com/instmsg/aliases/
deriks. imguard names it "deriks@im.example.com" (principal()). An instant message is a NOTIFY ([RVP] 5.6) whose
text/xml body is

    <r:notification xmlns:d="DAV:" xmlns:r="http://schemas.microsoft.com/rvp/">
      <r:message>
        <r:notification-from><r:contact><d:href>NODE URL</d:href>...</r:contact></r:notification-from>
        <r:notification-to><r:contact><d:href>NODE URL</d:href></r:contact></r:notification-to>
        <r:msgbody><r:mime-data>MIME-Version: 1.0 / Content-Type: text/plain ... (a MIME entity)</r:mime-data>
        </r:msgbody></r:message></r:notification>

(the namespace URI varies between revisions: anything ending in "/rvp/" is read). The MIME entity's type says what
it is: text/plain is the message; text/x-msmsgscontrol (TypingUser) carries nothing; text/x-msmsgsinvite is a
Windows Messenger invitation (a file offer names its file), handed to policy as text.

Who sends to whom is read from the body: notification-from (else the RVP-From-Principal header) is the sender,
notification-to the recipient. Where the NOTIFY goes says which way it flows:
    addressed to the recipient's node (the Request-URI is notification-to's path): the sender's client (or its
        server, federating) sends it  -> ChatMessage, decided as the client's message (the carrier: FROM_CLIENT)
    addressed anywhere else: the recipient's server delivers it to the Call-Back URL its client subscribed
        with ([RVP] 5.1.4 Notification delivery: the client runs an HTTP listener)
                                   -> DeliveredMessage, decided as a message delivered to the recipient
A block is answered with an HTTP error ([RVP] 6: any non-2xx NOTIFY response means not delivered; 403 here).

Routes: the default route "rvp=/instmsg/" takes the node URLs. A delivery goes to the path the client put in its
SUBSCRIBE's Call-Back header, which the client chooses: a site adds a route for it ("rvp=/" takes every NOTIFY).
The delivery is a connection the server opens to the client: a reverse listener in front of the client's
listener sees it as any request; in transparent mode imguard sees it only where the redirect also covers
connections into the inside network on the listener's port. Either way the HTTP client is the server, and the
carrier decides the DeliveredMessage as delivered to its recipient (origin server), not as the client's message.

RVP has no file mechanism of its own: Windows Messenger's file invitations (text/x-msmsgsinvite, Application-File)
set up a direct connection outside RVP, which imguard does not follow; the invitation's text goes to policy.
A mask rewrites the MIME body inside mime-data (bodies.rewrite, locator ("xml", "mime-data")), the rest of the
body byte-identical.
Presence (PROPPATCH, PROPFIND, SUBSCRIBE) is relayed untouched.
"""

from __future__ import annotations

import email.parser
import email.policy
import xml.etree.ElementTree as ET
from urllib.parse import unquote, urlsplit

from imguard.protocols.httpchat.common import DecodeLimits, malformed
from imguard.protocols.httpchat.events import (MESSAGE, ChatMessage, DeliveredMessage, Endpoint, HttpRequest,
                                               TextPart, credential_key)

API = "rvp"
DAV = "{DAV:}"
MIME_LOCATOR = ("xml", "mime-data")          # bodies.rewrite: the MIME body inside the mime-data element
TEXT = "text/plain"
INVITE = "text/x-msmsgsinvite"
CONTROL = "text/x-msmsgscontrol"


def classify(method: str, path: str) -> Endpoint | None:
    """NOTIFY carries the messages; everything else (presence, subscriptions) is relayed untouched."""
    if method.upper() == "NOTIFY":
        return Endpoint(API, "notify", MESSAGE)
    return None


def principal(url: str) -> str:
    """A node URL -> "alias@host" (http://im.example.com/instmsg/aliases/deriks -> deriks@im.example.com);
    a value that is not a URL is kept as it is."""
    url = url.strip()
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return url
    alias = unquote(parts.path.rstrip("/").rsplit("/", 1)[-1])
    return f"{alias}@{parts.hostname}" if alias else parts.hostname


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _is_rvp(tag: str) -> bool:
    return tag.startswith("{") and tag[1:].split("}", 1)[0].rstrip("/").lower().endswith("/rvp")


def _child(node: ET.Element | None, name: str) -> ET.Element | None:
    if node is None:
        return None
    return next((c for c in node if _local(c.tag) == name), None)


def _href(node: ET.Element | None) -> str:
    """The d:href of a notification-from / notification-to (inside its r:contact, or directly)."""
    contact = _child(node, "contact")
    for holder in (contact, node):
        href = holder.find(DAV + "href") if holder is not None else None
        if href is not None and (href.text or "").strip():
            return href.text.strip()
    return ""


class NotRvp(Exception):
    """The body is not an RVP notification (another protocol's NOTIFY, e.g. UPnP GENA): relayed untouched."""


def parse(body: bytes) -> tuple[str, str, str, str]:
    """(from node URL, to node URL, MIME type, text) of an RVP message NOTIFY. Raises NotRvp for a body that is
    not one, ValueError for one that is RVP but unreadable."""
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise ValueError("a DTD in the body (entity expansion) is refused")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        if b"/rvp/" in body:
            raise ValueError(f"the XML body cannot be parsed: {e}") from None
        raise NotRvp() from None
    if not _is_rvp(root.tag) or _local(root.tag) != "notification":
        raise NotRvp()
    message = _child(root, "message")
    if message is None:
        raise NotRvp()          # a property change (presence) notification
    mime = _child(_child(message, "msgbody"), "mime-data")
    if mime is None:
        raise ValueError("an RVP message without msgbody/mime-data")
    ctype, text = mime_text(mime.text or "")
    return (_href(_child(message, "notification-from")), _href(_child(message, "notification-to")), ctype, text)


def mime_text(data: str) -> tuple[str, str]:
    """The MIME entity inside mime-data -> (its content type, the text policy reads)."""
    msg = email.parser.Parser(policy=email.policy.compat32).parsestr(data.lstrip("\r\n"))
    ctype = msg.get_content_type() if msg.get("content-type") else TEXT
    payload = msg.get_payload()
    text = payload if isinstance(payload, str) else ""
    if ctype == CONTROL:
        return ctype, ""
    return ctype, text.strip("\r\n")


def _same_node(path: str, url: str) -> bool:
    target = unquote(urlsplit(url).path).rstrip("/").lower()
    return bool(target) and unquote(path).rstrip("/").lower() == target


def decode(ep: Endpoint, req: HttpRequest, limits: DecodeLimits = DecodeLimits()) -> list:
    """A NOTIFY -> ChatMessage (sent to the recipient's node) or DeliveredMessage (delivered to a client's
    Call-Back listener); [] for presence and other protocols' NOTIFY; MalformedRequest for broken RVP."""
    try:
        sent_by, sent_to, ctype, text = parse(req.body)
    except NotRvp:
        return []
    except ValueError as e:
        return [malformed(API, ep.name, e)]
    sender = principal(sent_by or req.header("rvp-from-principal")) or credential_key(req.header("authorization"))
    recipient = principal(sent_to) if sent_to else principal(f"http://{req.host}{req.path}")
    if not text:
        return []               # typing notifications, empty messages
    kind = {TEXT: "message", INVITE: "invite"}.get(ctype, ctype)
    message = ChatMessage(API, ep.name, sender, recipient, (TextPart(MIME_LOCATOR, text),), kind=kind)
    if not sent_to or _same_node(req.path, sent_to):
        return [message]
    return [DeliveredMessage(message, "", ("notify",))]


def requester(req: HttpRequest) -> str:
    """Whose request: the principal it names (RVP-From-Principal), else its credential's hash."""
    who = req.header("rvp-from-principal")
    return principal(who) if who else credential_key(req.header("authorization"))


def deliver(ep: Endpoint, req: HttpRequest, status: int, body: bytes, limits: DecodeLimits = DecodeLimits()) -> list:
    return []                   # messages are delivered as NOTIFY requests to the client (decode), not in responses


def rewrite_delivered(body: bytes, blocked=(), masked=()) -> bytes:
    raise ValueError("RVP delivers no messages in responses")


def learn(ep: Endpoint, req: HttpRequest, status: int, body: bytes) -> list:
    return []


def is_websocket(path: str) -> bool:
    return False


def error_body(status: int, reason: str) -> bytes:
    """The body of the error status the client acts on ([RVP] 6: a non-2xx NOTIFY answer = not delivered)."""
    return reason.encode("utf-8", "replace")
