"""XmppSession: imguard's protocol logic for one client-to-server XMPP connection (a StreamSession).

The carrier feeds it the plaintext of both directions; it frames each direction with
`XmlStreamDecoder`, and for every top-level element decides what crosses (see imguard.protocols.base
for the contract). In short:

* Allowed stanzas are relayed as the exact bytes received; nothing is re-serialised unless policy
  changes it (MASK). Partial stanzas stay buffered (bounded by `max_stanza_size`).
* STARTTLS (RFC 6120 §5): `<starttls/>` and `<proceed/>` are relayed; right after `<proceed/>` the
  session returns `StartTls()`; the carrier calls `tls_started()` when both legs are encrypted, and
  both decoders start a new stream. Direct TLS (XEP-0368) is the carrier's business
  (`tls_on_connect=True`). Plaintext that must not enter the TLS session is discarded with a high
  `starttls_injection` anomaly (the CVE-2011-0411 class): what follows `<proceed/>` in the same read, and
  what the client sends after its `<starttls/>` before the server's answer.
* Downgrade signs become anomalies: `<auth>` in plaintext although the server offered STARTTLS
  (`starttls_stripping`, high), plaintext `<auth>` with no STARTTLS offered (`plaintext_auth`,
  medium), pre-auth features without STARTTLS (`no_starttls_offered`, low). The stripped `<auth>` carries
  the credentials in the clear: with the fail mode `downgrade` closed (the default; `stripped_auth_open=False`)
  it is not forwarded, and the client gets a SASL `<failure>` with `<encryption-required/>` and a notice;
  with `downgrade=open` it is forwarded, with the alert.
* Identity: the SASL initial response (PLAIN authzid/authcid, SCRAM's n= username; SASL1 or
  XEP-0388 SASL2) names the user tentatively, the `<bind>` result's `<jid>` (or SASL2's
  `<authorization-identifier>`) is authoritative. Every ChatContext carries the bare JID as `sender`.
  Only the answer to the client's own bind request (the `<iq type='set'>` whose id it carries, from the
  server itself: no 'from', or the user's own bare JID or domain) names it, once: any other bind result
  (another account can address one to the client) is a high `unsolicited_bind` anomaly, changes nothing and
  is not forwarded; a second SASL2 `<success>` is likewise an anomaly and ignored.
* Both directions, by topology: what the client (the user behind the gateway) sends has `origin=FROM_CLIENT`
  in its context, what the server delivers to it `origin=FROM_SERVER`; the pipeline derives the direction.
* Client `<message>` with text -> `checker.check_message(text, ctx)`; the text is every `<body>`
  (also those of forwarded messages inside it, XEP-0297) plus the XHTML-IM rendering when it says
  something else (XEP-0071). ALLOW/ALERT: relayed; MASK: relayed with every `<body>` replaced by
  `decision.masked_text` and the XHTML-IM copy removed; BLOCK/QUARANTINE: dropped
  and the sender gets the standard RFC 6120 §8.3.3.12 answer, a `<message type='error'>` with the
  same id, "from" the recipient, carrying `<policy-violation/>` and the notice as `<text/>`, and the original
  `<body>` and `<thread>` beside it (libpurple shows a message error only with its body). (That is
  what real clients show next to the failed message; we send no extra chat message.)
* Server `<message>` with text (a message delivered to the client) -> decided the same way, with the
  context from its sender (the stanza's "from", bare; in a groupchat the occupant room/nick, and the room
  as the conversation) to the client's bare JID. ALLOW/ALERT: forwarded byte-exact; MASK: rewritten like
  the client's; BLOCK/QUARANTINE: not forwarded, and the client (its receiver) gets a notice from the
  server's domain naming the sender and the rules. A copy the server makes for its own user (XEP-0280
  carbons, XEP-0313 archive results, "from" the user's bare JID) is decided as the wrapped message: from
  and to its own parties, from the client side when the user sent it. The room's copy of the client's own
  groupchat message (same room, id and text) was decided on the way out and is forwarded as it is.
  Presences stay shallow (framed and bounded, no element tree) and are never checked, but those of the XEP-0045
  rooms the client is in or entering (parsed from their bytes) keep the rooms' occupant lists (policy/walls.Rooms)
  for the ethical walls: an entry into a room with the other side in it is refused with a presence error (the
  gateway leaves the room for the client), a groupchat message is decided against the room's occupants, and a room
  message from an occupant walled off from the client is not delivered (`_room_presence`; docs/rules.md "Rooms").
  iqs are parsed for what they carry (bind, upload slots, files) but never go to policy.
* WARN (imguard/conversation.py): the client's message is held and the client gets the policy-violation error with
  the notice and how to answer; its `!justify <reason>` / `!falsepositive` (a message to the same peer or room) is
  not forwarded: it releases the held stanza byte-exact or not, and the client gets a chat message from the server's
  domain saying so. A delivered message under WARN is refused like a block, unless it is the copy of one this gateway
  released (RELEASED). An IBB file under WARN is held the same way (the tracker's WARNED: the client gets a notice
  with how to answer, the answer releases or drops the held stanzas; `_warn_file`). A due disclaimer
  (Decision.disclaimers) goes before the message to both parties: a chat message from the server's domain to the
  client, one through the client's stream to the other party's address; in a room, a groupchat message from the
  room's address to the client (or, with disclaimer_in_room, one through the client's stream to the room).
* End-to-end encrypted messages (OMEMO, OpenPGP, legacy PGP, OTR) cannot be read: the session
  records an `e2e_encrypted` anomaly with the scheme and asks the checker with the text "" and the scheme in
  `ctx.encryption` (omemo, openpgp, otr), so policy decides on who/where and on the `encrypted` condition;
  MASK is not possible on ciphertext and is treated as ALERT.
* Files:
  - XEP-0047 IBB (`ibb.InBandBytestreams`): the IBB framing drives a HeldTransfer per stream
    (imguard.files.tracker), in either direction: a stream the client sends (outbound) and one the
    server delivers to it (an outside sender's file to our user: `sender_is_client=False`). Data blocks
    are held (base64-decoded, sequence-checked) and each data iq is answered by the session itself
    ("from" the receiver, towards the sender's side) so the sender keeps going; `<close>` gives
    `InspectFile(transfer_id='ibb:<sid>', mechanism 'ibb')`. Allowed: the held stanzas (data and
    close) are released byte-exact to the receiver and its results to them are swallowed. Blocked: the
    receiver gets an IBB `<close>`, the data is dropped, and the sender is told: our client by a notice
    message; a sender on the server's side by a policy-violation error message through the server,
    with a notice to our client (the receiver) as well. A transfer over `max_held_bytes`, with a
    sequence gap or bad base64 is cut on the spot (fail closed): error to the sender, `<close>` to
    the receiver, an anomaly.
  - XEP-0363 HTTP upload: the slot request and the server's slot are joined and registered in the
    shared ExpectedTransfers table under the PUT URL (`expect_upload`); the gateway's HTTP side scans
    the PUT. A message whose body, OOB `<url>` or XEP-0447 source carries a GET URL the table marks as
    blocked is blocked with a notice, both ways.
  - Files shared *with* the client by link (an outside contact's upload): a file URL the server delivers in a
    message's XEP-0066 OOB element or XEP-0447 `<file-sharing>` (and the body when it is exactly a URL beside
    them), in an XEP-0066 iq, or in an XEP-0234 Jingle offer (`offers.shared_files`, `jingle_shared_files`) is
    registered as an expected download (`expect_download`, keyed by the URL): from its sender to the client,
    origin FROM_SERVER, mechanism "xep-0363-get", this connection to tell. The gateway's HTTP side holds that
    GET's response for its verdict: blocked, the client gets a 403 and a notice here (`notice`).
  - XEP-0065 SOCKS5 bytestreams, both ways: an offer registers SHA1(sid + initiator + target) with the
    real streamhosts (`expect_bytestream`); with `bytestream_relay=(host, port)` every streamhost in the
    offer is rewritten to the gateway's relay, so the data must cross `Socks5BytestreamSession`. The
    client's own offer carries its file out (origin FROM_CLIENT, to the target); one the server delivers
    (an outside sender's) is rewritten on its way to the client, which then connects to the relay, and
    registered with the file from the initiator (bare) to our user, origin FROM_SERVER, this connection to
    tell when it is blocked. An offer the server delivers whose streamhosts are all the relay already (an
    offer another inside user made, rewritten on its way out; without a relay: whose hash is registered
    already) is relayed as it is and not registered again: its outbound leg holds the file.
    Jingle S5B (XEP-0260) candidates are registered and rewritten the same way, both ways (an initiator's
    carry its file to the responder, a responder's in session-accept the initiator's).
  - XEP-0096 SI and XEP-0234 Jingle offers, the client's and those the server delivers to it, give
    name/size/hash per sid for the transfers above (`offers.FileOffers`); XEP-0066 OOB links are
    recorded, both ways.
* Anomalies never raise: malformed input from the client ends its stream with a stream error and
  Close (other connections are unaffected); an unexpected exception does the same with
  `internal-server-error`.
* XEP-0198 stream management: every stanza dropped or injected shifts the two sides' stanza counts,
  so `<a h/>`, `<resume h/>` and `<resumed h/>` are translated (offsets are also kept in the shared
  table under the SM id, so a resumption on a new connection continues with them).
* Memory per connection is bounded: remembered ids, offers and slot requests live in a bounded,
  expiring table (`max_tracked_ids`, `tracked_id_ttl`); held IBB transfers by `max_transfers`, each
  by `max_held_bytes`, together with their stanzas by `ibb.connection_bound`, and with every other
  held file of the process by the tracker's ledger.

Not done (yet): a link inside an end-to-end encrypted body (an OMEMO aesgcm:// share) cannot be read, so its
download is not expected (the GET passes unscanned); the offline replay does not hold downloads; BOSH (XEP-0206)
and websocket (RFC 7395) framings; DIGEST-MD5 usernames (only bind names those users).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import re
import time
from typing import Any, Callable, Iterator, Protocol
from xml.etree import ElementTree as ET

from imguard.files.expected import (ExpectedBytestream, ExpectedDownload, ExpectedTransfers, ExpectedUpload, Listener,
                                    StreamHost, TransferSettings, http_goes_around, parse_upload_relays, relayed_url,
                                    refuses_unrelayed, upload_relay_url, url_origin)
from imguard.conversation import (RELEASED, SIDE_WARNINGS, Answer, ConversationSettings, HeldMessage,
                                  PendingWarnings, WarnOutcome, WarnState, file_key, outcome, parse_answer,
                                  release_decision, settle_answer, warn_instructions)
from imguard.files.tracker import HoldLedger
from imguard.model import BLOCK, FROM_CLIENT, FROM_SERVER, MASK, ChatContext, Decision, FileReport
from imguard.model import WARN
from imguard.policy.walls import Rooms, decide_room
from imguard.protocols.base import (Anomaly, Close, Command, Link, MembershipChecker, MessageDecision, Send,
                                    StartTls, StreamSession, Wake, block_words)
from imguard.protocols.xmpp import decoder as d
from imguard.protocols.xmpp.decoder import XmlStreamDecoder, XmppLimits
from imguard.protocols.xmpp.ibb import NS_IBB, InBandBytestreams
from imguard.protocols.xmpp.offers import (NS_JINGLE, NS_SFS, NS_SI, FileOffer, FileOffers, int_or_none, is_file_url,
                                           jingle_shared_files, shared_files, url_name)
from imguard.protocols.xmpp.xmlutil import attr, child, children, serialize, split, text

NS_CLIENT = "jabber:client"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_SASL2 = "urn:xmpp:sasl:2"                              # XEP-0388 (no stream restart after success)
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
NS_UPLOAD = "urn:xmpp:http:upload:0"
NS_BYTESTREAMS = "http://jabber.org/protocol/bytestreams"
NS_JINGLE_S5B = "urn:xmpp:jingle:transports:s5b:1"       # XEP-0260
NS_OOB_X = "jabber:x:oob"
NS_OOB_IQ = "jabber:iq:oob"
NS_XHTML_IM = "http://jabber.org/protocol/xhtml-im"
NS_SM = ("urn:xmpp:sm:3", "urn:xmpp:sm:2")                # XEP-0198 stream management
SM_KIND = "xmpp_sm"      # shared-table kind: SM id -> (c2s, s2c) count offsets, for resumption elsewhere

# (namespace, element) of a <message> child that means "end-to-end encrypted" -> scheme name
E2E_ELEMENTS = {
    ("eu.siacs.conversations.axolotl", "encrypted"): "omemo",
    ("urn:xmpp:omemo:2", "encrypted"): "omemo:2",
    ("urn:xmpp:openpgp:0", "openpgp"): "openpgp",
    ("jabber:x:encrypted", "x"): "pgp-legacy",
}

# decoder error kind -> the stream error condition sent to the client (RFC 6120 §4.9.3)
STREAM_ERROR_CONDITIONS = {
    d.MALFORMED: "not-well-formed",
    d.TEXT_AT_STREAM_LEVEL: "not-well-formed",
    d.DATA_AFTER_CLOSE: "not-well-formed",
    d.RESTRICTED: "restricted-xml",
    d.STANZA_TOO_LARGE: "policy-violation",
    d.HEADER_TOO_LARGE: "policy-violation",
    d.TOO_DEEP: "policy-violation",
    d.TOO_MANY_ATTRIBUTES: "policy-violation",
}

DEFAULT_NOTICE = "This message was blocked by the security policy."

# Bytes of a read parsed at a time: the first stanzas of a large read are decided (and can be forwarded)
# before the rest is parsed.
PARSE_PIECE = 1024
# The server's stanzas that are only forwarded: framed and bounded, but no element tree is built for them.
# (Its messages are decided like the client's; its iqs carry bind results, slots and in-band files.)
SERVER_STANZAS_FORWARDED = frozenset({"{%s}presence" % NS_CLIENT})
_BODY_TAGS: dict[str, tuple[str, str]] = {}     # a message's tag -> the tags of the bodies it may hold


def _body_tags(message_tag: str) -> tuple[str, str]:
    """<body> in the message's own namespace, or in jabber:client (forwarded messages keep theirs)."""
    ns = split(message_tag)[0]
    tags = ("{%s}body" % ns if ns else "body", _CLIENT_BODY)
    if len(_BODY_TAGS) < 64:                # a few namespaces in practice; a client cannot grow it unbounded
        _BODY_TAGS[message_tag] = tags
    return tags


_CTX_CACHE_SIZE = 64                    # message contexts kept per connection (one per peer)
_REFLECTIONS = 64       # the client's latest groupchat messages whose copy from the room is not decided again
# ElementTree's '{ns}local' tags of the children a message is looked at for
_IBB_DATA = "{%s}data" % NS_IBB
_OOB_X = "{%s}x" % NS_OOB_X
_SHARING_TAGS = frozenset({_OOB_X, "{%s}file-sharing" % NS_SFS})    # a file shared by link: XEP-0066, XEP-0447
_E2E_TAGS = {"{%s}%s" % key: scheme for key, scheme in E2E_ELEMENTS.items()}
_POLICY_SCHEME = {"omemo:2": "omemo", "pgp-legacy": "openpgp"}     # -> ChatContext.encryption (model.py's names)
_CLIENT_BODY = "{%s}body" % NS_CLIENT
# a refused message's children that its error bounce carries back (libpurple shows no error without the body)
_ECHOED_TAGS = frozenset({_CLIENT_BODY, "{%s}thread" % NS_CLIENT})
_FORWARDED_MESSAGE = "{urn:xmpp:forward:0}forwarded/{%s}message" % NS_CLIENT    # XEP-0297
# the wrappers of a message the server forwards to its own user: XEP-0280 carbons, XEP-0313 archive results
_COPY_WRAPPERS = frozenset({"{urn:xmpp:carbons:2}received", "{urn:xmpp:carbons:2}sent",
                            "{urn:xmpp:mam:2}result", "{urn:xmpp:mam:1}result", "{urn:xmpp:mam:0}result"})
_XHTML_HTML = "{%s}html" % NS_XHTML_IM
_URL = re.compile(r"(?:https?|aesgcm)://[^\s<>\"']+", re.IGNORECASE)

# kinds in the per-connection table
_SWALLOW = "swallow"     # stanza id -> True: the server's answer to it is dropped (we answered already)
_SWALLOW_CLIENT = "swallow_client"      # the same for the client's answers
_SLOT = "slot"           # iq id -> (name, size, content_type) of an upload slot request


def _link_relays(limits: XmppLimits, listener: Listener) -> dict[str, str]:
    """The upload relays (upstream origin -> relay origin) whose links are rewritten for a client that arrived on
    `listener`: none unless its HTTP goes around the gateway (XmppLimits.upload_relay_links)."""
    if not limits.upload_relay or not http_goes_around(limits.upload_relay_links, listener):
        return {}
    try:
        return parse_upload_relays(limits.upload_relay)
    except ValueError:              # refused when the gateway starts; a session never fails on it
        return {}


_MUC_USER_X = "{http://jabber.org/protocol/muc#user}x"     # XEP-0045 §7.8.2 mediated invitation
_MUC_INVITE = "{http://jabber.org/protocol/muc#user}invite"
_CONFERENCE_X = "{jabber:x:conference}x"                      # XEP-0249 direct invitation
_MUC_X = "{http://jabber.org/protocol/muc}x"                  # XEP-0045 §7.2.1: the client enters a room
_MUC_ITEM = "{http://jabber.org/protocol/muc#user}item"
_MUC_STATUS = "{http://jabber.org/protocol/muc#user}status"


def _invitations(el: ET.Element, from_client: bool) -> list[tuple[str, str, str]]:
    """(inviter, invitee, room) of each room invitation a message carries, "" where the stanza's own from/to
    stands for it: from the client, the mediated invitation's invitees (`<invite to=..>` in a message to the room)
    or the direct invitation's addressee; from the server, the mediated invitation's inviter (`<invite from=..>`
    in a message from the room) or the direct invitation's sender."""
    found = []
    x = el.find(_MUC_USER_X)    # two finds: every message pays for them (~1 us)
    if x is not None:
        room = bare(el.get("to" if from_client else "from", ""))
        for invite in x.iter(_MUC_INVITE):
            who = invite.get("to" if from_client else "from", "")
            if who:
                found.append(("", who, room) if from_client else (who, "", room))
    x = el.find(_CONFERENCE_X)
    if x is not None:
        found.append(("", el.get("to", ""), x.get("jid", "")) if from_client else
                     (el.get("from", ""), "", x.get("jid", "")))
    return found


def _look_at(el: ET.Element) -> tuple[ET.Element | None, list[ET.Element], str]:
    """A message's direct children, looked at once by their whole '{ns}local' tag: (an IBB block, the elements
    sharing a file by link (XEP-0066 OOB, XEP-0447), the end-to-end encryption scheme). (This runs for every
    message; split() per child cost more than the rest.)"""
    oob: list[ET.Element] = []
    scheme = ""
    for c in el:
        tag = c.tag
        if tag == _IBB_DATA:
            return c, oob, scheme
        if tag in _SHARING_TAGS:
            oob.append(c)
        elif not scheme and tag in _E2E_TAGS:
            scheme = _E2E_TAGS[tag]
    return None, oob, scheme


class MessageChecker(Protocol):
    def check_message(self, text: str, ctx: ChatContext) -> Decision: ...


def bare(jid: str) -> str:
    return jid.split("/", 1)[0]


def sasl_identity(mechanism: str, initial_response_b64: str) -> str:
    """The user a SASL initial response names (PLAIN: authzid or authcid; SCRAM-*: the n= username), or ''.
    The password in PLAIN is never kept."""
    try:
        raw = base64.b64decode(initial_response_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        return ""
    if mechanism == "PLAIN":
        parts = raw.split(b"\0")
        if len(parts) == 3:
            return (parts[0] or parts[1]).decode("utf-8", "replace")
    elif mechanism.startswith("SCRAM-"):
        fields = raw.decode("utf-8", "replace").split(",")   # gs2-flag, [a=authzid], n=user, r=nonce, ...
        if len(fields) >= 3:
            if fields[1].startswith("a="):
                return fields[1][2:].replace("=2C", ",").replace("=3D", "=")
            for f in fields[2:]:
                if f.startswith("n="):
                    return f[2:].replace("=2C", ",").replace("=3D", "=")
    return ""


def socks5_hash(sid: str, initiator: str, target: str) -> str:
    """XEP-0065 §5.3.2 DST.ADDR: hex SHA-1 of SID + initiator full JID + target full JID."""
    return hashlib.sha1((sid + initiator + target).encode("utf-8")).hexdigest()


class XmppSession(StreamSession):
    """One c2s XMPP connection. See the module docstring for what it does."""

    def __init__(self, checker: MessageChecker, transfers: ExpectedTransfers, context: ChatContext,
                 limits: XmppLimits = XmppLimits(), tls_on_connect: bool = False,
                 bytestream_relay: tuple[str, int] | None = None,
                 clock: Callable[[], float] = time.monotonic, hold_ledger: HoldLedger | None = None,
                 stripped_auth_open: bool = False, listener: Listener = Listener.NONE,
                 conversation: ConversationSettings | None = None):
        self.checker = checker
        # messages a `warn` rule holds until their sender answers (imguard/conversation.py)
        self.warnings = PendingWarnings(conversation or ConversationSettings(), clock)
        self.listener = listener         # how the connection reached the gateway: may its client's HTTP go around?
        self._link_relays = _link_relays(limits, listener)     # upstream origin -> relay origin, for delivered links
        self.stripped_auth_open = stripped_auth_open    # fail mode downgrade=open: a stripped <auth> still goes
        self.transfers = transfers
        self.context = context if context.protocol else context.with_(protocol="xmpp")
        self.limits = limits
        self.tls = tls_on_connect
        self.bytestream_relay = bytestream_relay
        self._clock = clock
        server_limits = dataclasses.replace(limits, max_stanza_size=limits.max_server_stanza_size)
        # The server's presences to its client are only forwarded: framed and bounded, but no element tree is
        # built for them (its messages are decided, and need theirs).
        self._decoders = {True: XmlStreamDecoder(limits),
                          False: XmlStreamDecoder(server_limits, shallow=SERVER_STANZAS_FORWARDED)}
        self.domain = ""                 # the server's domain (client header 'to', server header 'from')
        self.jid = ""                    # full JID from the bind result
        self.sasl_identity = ""          # bare JID from SASL PLAIN, until bind tells
        self._bind_id: str | None = None    # the id of the client's pending bind request
        self.authenticated = False
        self.closed = False
        self._sides_closed: set[bool] = set()   # from_client of each side that closed (stopped sending)
        self.tls_pending = False         # StartTls returned, tls_started() not yet called
        self._starttls_offered = False
        self._starttls_asked = False     # the client sent <starttls/>; nothing more until the server answers
        self._server_header_seen = False
        self._ids = ExpectedTransfers(TransferSettings(max_entries=limits.max_tracked_ids,
                                                       ttl_seconds=limits.tracked_id_ttl), clock)
        self._offers = FileOffers(self._ids)
        self.ibb = InBandBytestreams(self, limits, self._offers.get, clock, hold_ledger)
        self._ctx_cache: dict[tuple[str, str, bool], ChatContext] = {}
        # XEP-0198: the server counts the stanzas it got and sent, the client likewise; every stanza the
        # session drops or injects makes the two counts differ, so <a h=.../> is translated on the way.
        self._sm_c2s = 0      # client stanzas the server never got, minus stanzas injected towards the server
        self._sm_s2c = 0      # stanzas injected towards the client, minus server stanzas swallowed
        self._sm_id = ""
        self._refusals = 0               # error messages sent to senders on the server's side
        self._reflections: dict[tuple[str, str | None], int] = {}    # (room, id) -> hash of the text that crossed
        # XEP-0045 rooms (ethical walls): the occupants of the rooms our user is in; the rooms it is entering
        # (room -> (its nick, the room's presences held until the room's presence of our user)); rooms the gateway
        # took it out of, whose stanzas are dropped until the room confirms it left
        self.rooms = Rooms(limits.max_room_members)
        self._entering: dict[str, tuple[str, list[bytes]]] = {}
        self._held_bytes: dict[str, int] = {}       # room -> bytes of the presences held while entering it
        self._leaving: dict[str, str] = {}          # room -> our user's nick in it
        self._walls = isinstance(checker, MembershipChecker)     # (a Protocol isinstance costs microseconds)

    # --- identity ------------------------------------------------------------------------------

    @property
    def sender(self) -> str:
        """The bare JID of the authenticated user ('' before authentication)."""
        return bare(self.jid) if self.jid else self.sasl_identity

    @property
    def full_jid(self) -> str:
        return self.jid or self.sasl_identity

    def ctx(self, **changes: Any) -> ChatContext:
        return self.context.with_(sender=self.sender, **changes)

    def _message_ctx(self, to: str, groupchat: bool) -> ChatContext:
        """The context of a chat message the client sends to `to`. A connection talks to a few peers, thousands
        of times: one ChatContext per (sender, peer) is built once and reused (dataclasses.replace costs ~9 us,
        and the same object lets the pipeline and the event writer cache what they derive from it)."""
        key = (self.sender, to, groupchat)
        ctx = self._ctx_cache.get(key)
        if ctx is None:
            if len(self._ctx_cache) >= _CTX_CACHE_SIZE:     # a client messaging thousands of peers
                self._ctx_cache.clear()
            ctx = self._ctx_cache[key] = self.ctx(recipients=(to,) if to else (),
                                                  conversation=bare(to) if groupchat else "", origin=FROM_CLIENT)
        return ctx

    def _delivered_ctx(self, sender: str, recipient: str, room: str, origin: str = FROM_SERVER) -> ChatContext:
        """The context of a message the server delivers to the client: from `sender` (a bare JID, or a room
        occupant's room/nick) to `recipient` (the client's bare JID), in `room` for a groupchat. Cached per peer
        like _message_ctx."""
        key = (sender, recipient, room, origin)
        ctx = self._ctx_cache.get(key)
        if ctx is None:
            if len(self._ctx_cache) >= _CTX_CACHE_SIZE:
                self._ctx_cache.clear()
            ctx = self._ctx_cache[key] = self.context.with_(sender=sender, recipients=(recipient,) if recipient else (),
                                                            conversation=room, origin=origin)
        return ctx

    # --- the StreamSession contract ------------------------------------------------------------

    def data_received(self, from_client: bool, data: bytes) -> list[Command]:
        out: list[Command] = []
        for step in self.data_received_steps(from_client, data):
            out += step
        return out

    def data_received_steps(self, from_client: bool, data: bytes) -> Iterator[list[Command]]:
        """data_received, one stanza at a time: the commands for each top-level element as soon as it is
        decided, so a carrier can forward the first stanzas of a read while it checks the rest."""
        if self.closed:
            return
        if self.warnings and (expired := self.warnings.expire()):
            yield [*self.warnings.dropped(expired), *self._warned_files_dropped(expired)]   # past the window
        handle = self._client_event if from_client else self._server_event
        decoder = self._decoders[from_client]
        pieces = decoder.feed_pieces(data, PARSE_PIECE)
        discarded = -1                               # >= 0: StartTls returned, the rest of this read is dropped
        while True:
            try:                                     # never raise into the carrier
                events = next(pieces, None)
                if events is None:
                    if discarded >= 0 and discarded + decoder.buffered:
                        yield [self.anomaly("starttls_injection", "plaintext after <proceed/> in the same read was "
                                            "discarded: it must not enter the TLS session", severity="high",
                                            from_client=from_client, size=discarded + decoder.buffered)]
                    return
                for event in events:
                    if discarded >= 0:
                        discarded += len(getattr(event, "raw", b""))
                        continue
                    step = handle(event)
                    yield step
                    if self.closed:
                        return
                    if any(type(c) is StartTls for c in step):
                        discarded = 0
            except Exception as e:
                yield self._fail("internal_error", f"{type(e).__name__}: {e}", "internal-server-error", from_client)
                return

    def notice(self, text: str) -> list[Command]:
        """Tell our user something from outside this connection (a file blocked on a SOCKS5 bytestream
        or an HTTP upload): a chat message from the server's domain."""
        if not self.full_jid:
            return []
        return [self.notice_message(self.full_jid, text)]

    def addressee(self) -> str:
        return bare(self.jid) if self.jid and not self.closed else ""

    def tls_started(self) -> list[Command]:
        self.tls = True
        self.tls_pending = False
        self._starttls_offered = False
        self._starttls_asked = False
        self._server_header_seen = False
        for dec in self._decoders.values():
            dec.reset()
        return []

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        if decision.action == WARN:
            return self._warn_file(transfer_id, report, decision)
        return self.ibb.verdict(transfer_id, decision)      # the only files held on this connection

    def _warn_file(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        """A warn on an IBB file (imguard/conversation.py): our sender's is held for the answer (the tracker tells
        the sender how); the copy of a file justified on another connection of this gateway is delivered; an
        outside sender's is refused like a block."""
        stream = self.ibb.files.get(transfer_id)
        if stream is None or stream.transfer is None:
            return []
        ctx = stream.transfer.context
        if stream.sender_is_client:
            displaced = self.warnings.hold(self.sender, bare(stream.receiver), ctx, report.name, decision, b"",
                                           tag=transfer_id, report=report)
            return [*self.warnings.dropped(displaced), *self._warned_files_dropped(displaced),
                    *self.ibb.verdict(transfer_id, decision, warn_instructions(self.warnings.settings)),
                    Wake(self.warnings.wake_after())]
        if RELEASED.take(ctx.sender, file_key(report.sha256)):
            return [WarnOutcome(report.name, ctx, decision, state=WarnState.DELIVERED, delivered=True, report=report),
                    *self.ibb.verdict(transfer_id, release_decision(decision))]
        return self.ibb.verdict(transfer_id, decision)

    def wake(self) -> list[Command]:
        """A warning's window ended (the Wake of its hold): what is past it dropped, recorded, its held files
        refused to their receivers, on an idle connection too."""
        if self.closed or not self.warnings:
            return []
        expired = self.warnings.expire()
        return [*self.warnings.dropped(expired), *self._warned_files_dropped(expired)]

    def _warned_files_dropped(self, held: list[HeldMessage]) -> list[Command]:
        """Held files that ended undelivered (expired, displaced, a false positive kept): their transfers dropped."""
        out: list[Command] = []
        for h in held:
            if h.report is not None:
                out += self.ibb.verdict(h.tag, h.decision)
        return out

    def connection_closed(self, from_client: bool) -> list[Command]:
        """One side stopped sending: the files held are given up, and the carrier passes the close on as the peer
        made it (a half-close: the other side's stanzas, a closing </stream:stream>, are still checked and
        forwarded until it closes too)."""
        if self.closed:
            return []
        self._sides_closed.add(from_client)
        if len(self._sides_closed) == 2:
            return self._stop()
        return self.ibb.connection_closed()

    def _stop(self) -> list[Command]:
        """The connection ends (closed by a side, or by the session): the files held are given up now, so their
        bytes leave the gateway's ledger with it."""
        self.closed = True
        out: list[Command] = [*self.warnings.dropped(self.warnings.abandon()), *self.ibb.connection_closed()]
        for side in SIDE_WARNINGS.abandon(self.context.connection_id) if self.context.connection_id else ():
            out += [outcome(side.held, self.warnings.clock()), Wake(connection_id=side.side)]  # its bytestream dropped
        return out

    # --- client -> server ----------------------------------------------------------------------

    def _client_event(self, event: d.Event) -> list[Command]:
        if isinstance(event, d.XmlError):
            return self._fail(event.kind, event.detail, STREAM_ERROR_CONDITIONS.get(event.kind, "not-well-formed"),
                              True)
        if isinstance(event, d.StreamOpened):
            self.domain = self.domain or event.attrs.get("to", "")
        if not isinstance(event, d.Stanza):
            return [Send(to_client=False, data=event.raw)]
        el = event.element
        ns, local = split(el.tag)
        if self._starttls_asked and not self.tls:
            self.dropped(1)
            return [self.anomaly("starttls_injection", "a stanza sent after <starttls/> before the server's "
                                 "answer was discarded (it would be read as sent inside TLS)", severity="high",
                                 from_client=True, size=len(event.raw))]
        if ns == NS_TLS and local == "starttls" and not self.tls:
            self._starttls_asked = True
        if (ns, local) in ((NS_SASL, "auth"), (NS_SASL2, "authenticate")):
            return self._client_auth(event)
        if ns in NS_SM:
            return self._client_sm(event, ns, local)
        if local == "message":
            return self._client_message(event)
        if local == "iq":
            return self._client_iq(event)
        if local == "presence" and el.find(_MUC_X) is not None and "/" in el.get("to", "") \
                and el.get("type", "") == "" and self._walls:
            room, _, nick = el.get("to", "").partition("/")
            if room not in self.rooms:          # entering a room (else a status change in it)
                self.rooms.open(room)
                self._entering[room] = (nick, [])
        return [self._forward(event)]

    def _client_auth(self, st: d.Stanza) -> list[Command]:
        out: list[Command] = []
        mechanism = st.element.get("mechanism", "")
        initial = st.element.text
        if split(st.element.tag)[0] == NS_SASL2:
            response = child(st.element, NS_SASL2, "initial-response")
            initial = response.text if response is not None else None
        identity = sasl_identity(mechanism, initial or "")
        if identity:                                 # first, so the alerts below name the user
            if "@" not in identity and self.domain:
                identity = f"{identity}@{self.domain}"
            self.sasl_identity = bare(identity)
        if not self.tls and self._starttls_offered:
            out.append(self.anomaly("starttls_stripping", "the client authenticates in plaintext although "
                                    "the server offered STARTTLS (downgrade or misconfigured client)",
                                    severity="high", mechanism=mechanism))
            if not self.stripped_auth_open:        # fail mode downgrade closed: the credentials stay here
                ns = split(st.element.tag)[0]
                notice = ("imguard: authentication without the encryption the server offers was refused; "
                          "enable STARTTLS in your client")
                return out + [Send(to_client=True, data=(
                    f"<failure xmlns='{ns}'><encryption-required xmlns='{NS_SASL}'/><text>{text(notice)}</text>"
                    "</failure>").encode("utf-8"))]
        elif not self.tls:
            out.append(self.anomaly("plaintext_auth", "SASL authentication on an unencrypted stream",
                                    severity="medium", mechanism=mechanism))
        out.append(self._forward(st))
        return out

    def _client_message(self, st: d.Stanza) -> list[Command]:
        el = st.element
        ibb, oob, scheme = _look_at(el)
        if ibb is not None:
            return self.ibb.data(st, ibb)
        if el.get("type") == "error":
            return [self._forward(st)]
        to = el.get("to", "")
        groupchat = el.get("type") == "groupchat"
        ctx = self._message_ctx(to, groupchat)
        body = el.find(_CLIENT_BODY)
        answer = parse_answer(body.text, self.warnings.settings) if body is not None and not oob else None
        if answer is not None:                  # the sender answers a warning: to imguard, it never crosses
            return self._warn_answer(bare(to), answer)
        refused = self._invitation_refused(el, True) or (groupchat and self._walled_room_message(bare(to)))
        if refused:
            return self._refuse_message(el, refused)
        return self._decide_message(st, ctx, oob, scheme, True, (bare(to), el.get("id")) if groupchat else None)

    def _invitation_refused(self, el: ET.Element, from_client: bool) -> str:
        """The notice when a room invitation in the message is refused by policy's ethical walls
        (checker.check_membership, which records each decision), else ""."""
        found = _invitations(el, from_client)
        if not found or not isinstance(self.checker, MembershipChecker):
            return ""
        for inviter, invitee, room in found:
            if from_client:
                ctx = self.ctx(recipients=(bare(invitee),), conversation=bare(room), origin=FROM_CLIENT)
            else:
                ctx = self.context.with_(sender=bare(inviter), recipients=(self.sender,), conversation=bare(room),
                                         origin=FROM_SERVER)
            decision = self.checker.check_membership("invite", ctx, bare(room))
            if decision.blocked:
                why = "; ".join(m.title or m.rule_id for m in decision.matches) or "policy"
                return (f"Your invitation of {bare(invitee)} to {bare(room)} was blocked by imguard: {why}"
                        if from_client else
                        f"imguard: an invitation from {bare(inviter)} to {bare(room)} was blocked: {why}")
        return ""

    # --- rooms and their occupants (ethical walls) ----------------------------------------------------------

    def _room_presence(self, st: d.Stanza) -> list[Command]:
        """A presence from a room our user is in or entering (XEP-0045 §7.2.3: the room sends the occupants'
        presences, then our user's own, status 110). Non-anonymous rooms name each occupant's real JID (its
        identity for the groups); a semi-anonymous room does not, and its occupants count for no group.
        Entering: the room's presences are held until our user's own, then the entry is decided against the
        occupants; refused, the client gets a presence error (policy-violation) as if the room had refused it,
        the presences held are dropped, the gateway leaves the room for it, and what the room sends until it
        confirms is dropped. In the room: a new occupant's arrival is decided (an event when a wall matches; our
        user is told), and from then on our user's messages to the room are refused while it is there."""
        el = st.element
        frm = el.get("from", "")
        room, _, nick = frm.partition("/")
        ptype = el.get("type", "")
        if room in self._leaving:
            if nick == self._leaving[room] and ptype in ("unavailable", "error"):
                del self._leaving[room]         # the room confirms: our user is out
            self.dropped(1, from_client=False)
            return []
        entering = self._entering.get(room)
        if ptype == "error":
            if entering is not None and nick == entering[0]:
                del self._entering[room]
                self._held_bytes.pop(room, None)
                self.rooms.close(room)
                return [Send(True, raw) for raw in entering[1]] + [Send(True, st.raw)]
            return [Send(True, st.raw)]
        try:
            full = ET.fromstring(st.raw)
        except ET.ParseError as e:          # (a prefix only the stream header declares): not read, passed on
            held = self._entering.pop(room, (nick, []))[1]
            self._held_bytes.pop(room, None)
            return [self.anomaly("unreadable_room_presence", f"a presence from {room} could not be read for its "
                                 f"occupant ({e}); forwarded undecided", from_client=False, room=room),
                    *(Send(True, raw) for raw in held), Send(True, st.raw)]
        codes = {s.get("code") for s in full.iter(_MUC_STATUS)}
        item = full.find(".//" + _MUC_ITEM)
        identity = bare(item.get("jid", "")) if item is not None else ""
        ours = "110" in codes or (entering is not None and nick == entering[0])
        out: list[Command] = []
        if ptype == "unavailable" and "303" in codes:       # a nick change (§7.6): the same occupant, renamed
            if not ours:
                known = self.rooms.leave(room, nick)
                new = item.get("nick", "") if item is not None else ""
                if new and known is not None:
                    self.rooms.enter(room, new, known)
        elif ptype == "unavailable":
            if ours:                        # our user left (or never got in): what was held goes on as it came
                out += [Send(True, raw) for raw in self._entering.pop(room, (nick, []))[1]]
                self._held_bytes.pop(room, None)
                self.rooms.close(room)
            else:
                self.rooms.leave(room, nick)
        elif not ours:
            known = not identity or self.rooms.has(room, identity)
            if not self.rooms.enter(room, nick, identity):
                out.append(self.anomaly("room_members_overflow", f"more than {self.limits.max_room_members} room "
                                        "occupants on this connection: not all recorded", from_client=False,
                                        room=room))
            elif entering is None and not known:
                out += self._occupant_arrived(room, identity)
        held_bytes = self._held_bytes.get(room, 0) + len(st.raw)
        if entering is not None and not ours and len(entering[1]) < self.limits.max_room_members \
                and held_bytes <= self.limits.max_server_stanza_size:
            entering[1].append(st.raw)      # (bounded: as many as the member limit, as big as a server stanza)
            self._held_bytes[room] = held_bytes
            return out
        if entering is not None and ours and ptype != "unavailable":
            del self._entering[room]
            self._held_bytes.pop(room, None)
            return out + self._our_entry(room, nick, entering[1], st.raw)
        return out + [Send(True, st.raw)]

    def _our_entry(self, room: str, nick: str, held: list[bytes], own: bytes) -> list[Command]:
        members = tuple(m for m in self.rooms.identities(room, besides=nick) if m != self.sender)
        decision = self.checker.check_membership("join", self.ctx(
            recipients=members, conversation=room, origin=FROM_CLIENT), room) if members else None
        if decision is None or not decision.blocked:
            return [Send(True, raw) for raw in held] + [Send(True, own)]
        why = "; ".join(m.title or m.rule_id for m in decision.matches) or "policy"
        notice = f"Your entry into {room} was refused by imguard: {why}"
        self.dropped(len(held) + 1, from_client=False)
        self.rooms.close(room)
        self._leaving[room] = nick
        occupant = f"{room}/{nick}"
        return [self.inject(False, f"<presence type='unavailable' to={attr(occupant)}/>".encode("utf-8")),
                self.inject(True, (f"<presence type='error' from={attr(occupant)}"
                                   + (f" to={attr(self.full_jid)}" if self.full_jid else "")
                                   + f"><x xmlns='http://jabber.org/protocol/muc'/><error type='cancel'>"
                                   f"<policy-violation xmlns='{NS_STANZAS}'/><text xmlns='{NS_STANZAS}'>"
                                   f"{text(notice)}</text></error></presence>").encode("utf-8"))]

    def _occupant_arrived(self, room: str, identity: str) -> list[Command]:
        decision = self.checker.check_membership("join", self._delivered_ctx(identity, self.sender, room), room)
        if not decision.blocked:
            return []
        why = "; ".join(m.title or m.rule_id for m in decision.matches) or "policy"
        return [self.notice_message(self.full_jid, f"imguard: {identity} entered {room}: {why}. Your messages to "
                                                   f"{room} are not delivered while they are there.")]

    def _walled_room_message(self, room: str) -> str:
        """The wall's notice when our user's message to `room` is refused (its recipients, for the walls, are the
        room's occupants), else ""."""
        if room not in self.rooms or not self._walls:
            return ""
        decision = decide_room(lambda ctx: self.checker.check_membership("message", ctx, room), self.rooms, room,
                               lambda members: self._room_ctx(room, members), exclude=self.sender)
        return (decision.notice or DEFAULT_NOTICE) if decision is not None and decision.blocked else ""

    def _room_ctx(self, room: str, members: tuple[str, ...]) -> ChatContext:
        """Our user's message to `room`, its recipients the room's `members` (cached as _message_ctx)."""
        key = (self.sender, room, members)
        ctx = self._ctx_cache.get(key)
        if ctx is None:
            if len(self._ctx_cache) >= _CTX_CACHE_SIZE:
                self._ctx_cache.clear()
            ctx = self._ctx_cache[key] = self.ctx(recipients=members, conversation=room, origin=FROM_CLIENT)
        return ctx

    def _walled_delivery(self, room: str, nick: str) -> str:
        """A room's message to our user from the occupant `nick`: decided by the walls, its sender the occupant's
        real JID and our user its recipient. Refused: the notice for our user, else ""."""
        if room not in self.rooms or not self._walls:
            return ""
        identity = self.rooms.identity(room, nick)
        if not identity or identity == self.sender:
            return ""
        decision = self.checker.check_membership("message", self._delivered_ctx(identity, self.sender, room), room)
        if not decision.blocked:
            return ""
        why = "; ".join(m.title or m.rule_id for m in decision.matches) or "policy"
        return f"imguard: a message from {identity} in {room} was blocked: {why}"

    def _decide_message(self, st: d.Stanza, ctx: ChatContext, oob: list[ET.Element], scheme: str,
                        from_client: bool, groupchat: tuple[str, str | None] | None) -> list[Command]:
        """A message with its context, from either side: its text checked, then forwarded, rewritten or refused.
        `groupchat`: (room, id) of a groupchat message (the client's is remembered, the room's copy of it back to
        the client is not decided again)."""
        el = st.element
        # every <body>: the message's own and those of forwarded messages (XEP-0297) inside it; and the
        # XHTML-IM rendering (XEP-0071), which a client may show instead of <body>. One walk, comparing
        # whole '{ns}local' tags.
        body_tags = _BODY_TAGS.get(el.tag) or _body_tags(el.tag)
        bodies: list[ET.Element] = []
        xhtml: list[ET.Element] = []
        for e in el.iter():
            if e.tag in body_tags:
                bodies.append(e)
            elif e.tag == _XHTML_HTML:
                xhtml.append(e)
        texts = [b.text or "" for b in bodies]
        for h in xhtml:
            rendered = "".join(h.itertext())
            if " ".join(rendered.split()) not in (" ".join(t.split()) for t in texts):
                texts.append(rendered)
        body = "\n".join(texts) if bodies or xhtml else None
        if body is not None and groupchat is not None and groupchat[1] and not from_client:
            crossed = self._reflections.pop(groupchat, None)
            if crossed is not None and crossed == hash(body):
                return [self._forward_to(st, from_client)]      # the room's copy of what the client sent
        shared = shared_files(oob) if oob else ()
        oob_urls = [url for url, _ in shared]
        out: list[Command] = [Link(ctx, url) for url in oob_urls]

        # Links to a file that was blocked (XEP-0363 GET URLs): looked for once any file was blocked.
        urls = (oob_urls + (_URL.findall(body) if body else [])) if self.transfers.any_blocked_urls else ()
        for url in urls:
            reason = self.transfers.blocked_url_reason(url)
            if reason is not None:
                notice = f"This message links to a file that was blocked: {reason}"
                decision = Decision(action=BLOCK, notice=notice)
                out.append(MessageDecision(body, ctx, decision))
                if from_client:
                    return out + self._refuse_message(el, notice)
                return out + self._refuse_delivery(f"imguard: a message from {ctx.sender} was blocked: it links "
                                                   f"to a file that was blocked ({reason})")
        if shared and not from_client and ctx.origin == FROM_SERVER:      # a file shared with our user by link
            self._expect_downloads(ctx, shared, body)

        if not scheme and body is not None and body.lstrip().startswith("?OTR"):
            scheme = "otr"
        if scheme:
            out.append(self.anomaly("e2e_encrypted", "an end-to-end encrypted message: its content cannot "
                                    "be inspected", ctx=ctx, severity="info", scheme=scheme))
            text_to_check = ""
            ctx = ctx.with_(encryption=_POLICY_SCHEME.get(scheme, scheme))     # what policy's `encrypted` sees
        elif body is None:
            return out + [self._forward_to(st, from_client)]       # chat states, receipts, markers: no text
        else:
            text_to_check = body
        decision = self.checker.check_message(text_to_check, ctx)
        if decision.action == WARN and not scheme:
            if from_client:                 # held until the sender answers in the chat (imguard/conversation.py)
                return out + self._warn_hold(st, ctx, text_to_check, decision, groupchat)
            if RELEASED.take(ctx.sender, text_to_check):      # the copy of a message its sender justified
                return out + [WarnOutcome(text_to_check, ctx, decision, state=WarnState.DELIVERED, delivered=True),
                              self._forward_to(st, from_client)]
        if decision.blocked:
            if from_client:
                return out + self._refuse_message(el, decision.notice or DEFAULT_NOTICE)
            action, why = block_words(decision)
            return out + self._refuse_delivery(f"imguard: a message from {ctx.sender or 'an unknown sender'} "
                                               f"was {action} ({why})")
        if decision.disclaimers:            # first contact (or the period passed): both parties told, before it
            out += self._disclaimers(el.get("to" if from_client else "from", ""), decision, ctx.conversation)
        if decision.action == MASK and not scheme and (bodies or xhtml):
            masked = decision.masked_text if decision.masked_text is not None else ""
            for b in bodies:
                b.text = masked
            parents = {c: p for p in el.iter() for c in p}
            for h in xhtml:                          # the rich copy would show the unmasked text
                parents[h].remove(h)
            if groupchat is not None and groupchat[1] and from_client:
                self._remember_reflection(groupchat, "\n".join(masked for _ in bodies))
            return out + [Send(to_client=not from_client, data=serialize(el, split(el.tag)[0]))]
        if groupchat is not None and groupchat[1] and from_client and body is not None:
            self._remember_reflection(groupchat, body)
        return out + [self._forward_to(st, from_client)]

    def _warn_hold(self, st: d.Stanza, ctx: ChatContext, body: str, decision: Decision,
                   groupchat: tuple[str, str | None] | None) -> list[Command]:
        """Hold the client's message for its sender's answer; the sender gets the policy-violation error (the notice
        and how to answer), next to the message in their client, so the answer goes to the same chat."""
        el = st.element
        displaced = self.warnings.hold(self.sender, bare(el.get("to", "")), ctx, body, decision, st.raw,
                                       tag=groupchat if groupchat is not None and groupchat[1] else None)
        notice = (decision.notice or DEFAULT_NOTICE) + warn_instructions(self.warnings.settings)
        return [*self.warnings.dropped(displaced), *self._refuse_message(el, notice),
                Wake(self.warnings.wake_after())]     # its window ends even on an idle connection

    def _warn_answer(self, to: str, answer: Answer) -> list[Command]:
        """The client answers a warning (!justify, !falsepositive): recorded, the held stanza released as the client
        sent it or not, the client told; the answer itself never crosses."""
        self.dropped(1)
        settled, side = settle_answer(self.warnings, self.context.connection_id, self.sender, to, answer)
        out: list[Command] = [settled.fact] if settled.fact is not None else []
        if side:                                # a SOCKS5 bytestream file held on its own connection: settled there
            out.append(Wake(connection_id=side))
        elif settled.held is not None and settled.held.report is not None:     # a held file: released or dropped
            out += self.ibb.verdict(settled.held.tag, release_decision(settled.held.decision)) \
                if settled.deliver is not None else self._warned_files_dropped([settled.held])
        elif settled.deliver is not None:
            out.append(self.inject(False, settled.deliver.payload))
            if settled.deliver.tag is not None:          # a groupchat (room, id): the room's copy was decided here
                self._remember_reflection(settled.deliver.tag, settled.deliver.text)
        if self.full_jid:
            out.append(self.notice_message(self.full_jid, settled.notice))
        return out

    def _disclaimers(self, peer: str, decision: Decision, room: str = "") -> list[Command]:
        """The disclaimer the pipeline found due for this conversation, to both parties: our user gets a chat message
        from the server's domain, the other party (`peer`, the address of the message's other end, as the stanza
        names it: the server routes it as it routes the message, so it arrives first) a chat message through our
        user's stream (from our user). In a `room`: a groupchat message from the room's bare JID to our user, or with
        disclaimer_in_room one through our user's stream to the room (whose copy every occupant, our user too, gets)."""
        out: list[Command] = []
        if room:
            return [self._room_disclaimer(room, m.notice) for m in decision.disclaimers]
        for m in decision.disclaimers:
            if self.full_jid:
                out.append(self.notice_message(self.full_jid, m.notice))
            if peer:
                out.append(self.inject(False, (f"<message type='chat' to={attr(peer)}><body>{text(m.notice)}</body>"
                                               "</message>").encode("utf-8")))
        return out

    def _room_disclaimer(self, room: str, notice: str) -> Send:
        """A room's disclaimer (imguard/conversation.py), in the room's window."""
        if self.warnings.settings.disclaimer_in_room:
            return self.inject(False, (f"<message type='groupchat' to={attr(room)}><body>{text(notice)}</body>"
                                       "</message>").encode("utf-8"))
        return self.inject(True, (f"<message type='groupchat' from={attr(room)} to={attr(self.full_jid)}><body>"
                                  f"{text(notice)}</body></message>").encode("utf-8"))

    def _remember_reflection(self, key: tuple[str, str | None], crossed: str) -> None:
        """The client's groupchat message (room, id) crossed with the text `crossed`: the room sends it back to every
        occupant, the client too, and that copy was decided already. The latest few are kept (the copy comes back
        within moments)."""
        if len(self._reflections) >= _REFLECTIONS:
            del self._reflections[next(iter(self._reflections))]
        self._reflections[key] = hash(crossed)

    def _expect_downloads(self, ctx: ChatContext, shared, body: str | None = None) -> None:
        """Files shared with the client by link (`shared`: (URL, FileOffer) pairs): their GETs are expected downloads,
        the file's context from `ctx` (its sender, the client as receiver, origin FROM_SERVER), so the gateway's HTTP
        side holds and scans what comes in. A body that is exactly one URL, beside them, names a file too (the body
        Conversations, Dino and Gajim send is the upload's URL)."""
        files = [(url, offer) for url, offer in shared if is_file_url(url)]
        if body is not None and shared:
            text = body.strip()
            if text and _URL.fullmatch(text) and is_file_url(text) and all(text != url for url, _ in files):
                files.append((text, FileOffer(url_name(text))))
        if not files:
            return
        file_ctx = ctx.with_(transfer_mechanism="xep-0363-get")
        for url, offer in files:
            self.transfers.expect_download(ExpectedDownload(url=url, name=offer.name, size=offer.size,
                                                            content_type=offer.content_type, context=file_ctx))

    def _refuse_message(self, el: ET.Element, notice: str) -> list[Command]:
        """Drop the message; tell the sender with an RFC 6120 policy-violation error stanza that carries the
        original <body> and <thread> beside the <error> (RFC 6120 §8.3.1 lets an error stanza include the original
        payload). libpurple (Pidgin, Finch) shows a message error only with a body: its jabber_message_parse
        (libpurple/protocols/jabber/message.c) takes the first <body> in jabber:client and the <error>'s <text>,
        and handle_error() starts `if(!jm->body) return;` before it shows "Message delivery to <from> failed:
        <text>" with the body; without the body the user saw nothing at all."""
        sid = el.get("id")
        frm = el.get("to") or self.domain
        original = b"".join(serialize(c, NS_CLIENT) for c in el if c.tag in _ECHOED_TAGS).decode("utf-8")
        xml = ("<message type='error'" + (f" id={attr(sid)}" if sid is not None else "")
               + (f" from={attr(frm)}" if frm else "") + (f" to={attr(self.full_jid)}" if self.full_jid else "")
               + f">{original}<error type='modify'><policy-violation xmlns='{NS_STANZAS}'/>"
               f"<text xmlns='{NS_STANZAS}'>{text(notice)}</text></error></message>")
        self.dropped(1)
        return [self.inject(True, xml.encode("utf-8"))]

    def _refuse_delivery(self, notice: str) -> list[Command]:
        """Drop a message the server delivers; tell the client (its receiver) why, in a notice from the server's
        domain. Its sender, on the server's side, is not told (the decision is recorded)."""
        self.dropped(1, from_client=False)
        return [self.notice_message(self.full_jid, notice)]

    def _client_iq(self, st: d.Stanza) -> list[Command]:
        el = st.element
        itype = el.get("type", "")
        if itype in ("result", "error") and el.get("id") is not None \
                and self._ids.take(el.get("id"), kind=_SWALLOW_CLIENT) is not None:
            self.dropped(1)                         # the asker, on the server's side, already got our answer
            return []
        for c in el:
            ns, local = split(c.tag)
            if ns == NS_IBB and itype == "set":       # (an error iq may quote an IBB payload: not ours)
                if local == "open":
                    return self.ibb.open(st, c)
                if local == "data":
                    return self.ibb.data(st, c)
                if local == "close":
                    return self.ibb.close(st, c)
            elif itype == "set" and ns == NS_BIND and local == "bind" and not self.jid:
                self._bind_id = el.get("id")            # only its answer may name the user
            elif itype == "set" and ns == NS_SI and local == "si":
                self._offers.remember_si(c)
            elif itype == "set" and ns == NS_JINGLE and local == "jingle":
                self._offers.remember_jingle(c)
                return self._jingle_s5b(st, c)
            elif itype == "set" and ns == NS_BYTESTREAMS and local == "query" \
                    and child(c, NS_BYTESTREAMS, "streamhost") is not None:
                return self._bytestream_offer(st, c)
            elif itype == "set" and ns == NS_OOB_IQ and local == "query":
                url = child(c, NS_OOB_IQ, "url")
                if url is not None and url.text:
                    to = el.get("to", "")
                    return [Link(self.ctx(recipients=(to,) if to else (), origin=FROM_CLIENT), url.text.strip()),
                            self._forward(st)]
            elif itype == "get" and ns == NS_UPLOAD and local == "request" and el.get("id"):
                self._ids.expect(el.get("id"), (c.get("filename", ""), int_or_none(c.get("size")),
                                                c.get("content-type", "")), kind=_SLOT)
        return [self._forward(st)]

    # --- XEP-0065 / XEP-0260 SOCKS5 bytestreams, both ways ----------------------------------------

    def _is_relay(self, host: str, port: int | None) -> bool:
        return self.bytestream_relay is not None and (host, port) == self.bytestream_relay

    def _relayed(self, hosts: list[StreamHost], dst_hash: str, from_client: bool) -> bool:
        """An offer the server delivers that already crossed this gateway: every streamhost is our relay (another
        inside user's offer, rewritten on its way out) or, without a relay, its hash is registered already. Its
        outbound leg holds the file: the offer is neither rewritten nor registered again."""
        if from_client:
            return False
        if self.bytestream_relay is not None:
            return all(self._is_relay(h.host, h.port) for h in hosts)
        return self.transfers.lookup_bytestream(dst_hash) is not None

    def _bytestream_ctx(self, sender: str, receiver: str, from_client: bool) -> ChatContext:
        """The context of a file on a bytestream from `sender` to `receiver` (full JIDs): this client's file
        (origin FROM_CLIENT, to its peer), or one the server's side sends it (from the peer, bare, to our user)."""
        if bare(sender) == self.sender or (from_client and not sender):
            return self.ctx(recipients=(receiver,) if receiver else (), transfer_mechanism="socks5",
                            origin=FROM_CLIENT)
        peer = bare(sender)
        return self._delivered_ctx(peer, self.sender, "").with_(transfer_mechanism="socks5")

    def _send_rewritten(self, st: d.Stanza, from_client: bool) -> list[Command]:
        el = st.element
        return [Send(to_client=not from_client, data=serialize(el, split(el.tag)[0]))]

    def _jingle_s5b(self, st: d.Stanza, jingle: ET.Element, from_client: bool = True) -> list[Command]:
        """XEP-0260 candidates, offered by this client or delivered to it by the server (an outside party's):
        registered like XEP-0065 streamhosts (DST.ADDR = SHA1(sid + offering JID + other JID), or the transport's
        dstaddr) and rewritten to the relay. An initiator offers a file, a responder's candidates (session-accept)
        carry the initiator's file the other way."""
        el = st.element
        forward = [self._forward(st)] if from_client else [Send(to_client=True, data=st.raw)]
        action = jingle.get("action", "")
        if action not in ("session-initiate", "session-accept", "transport-replace", "transport-accept",
                          "content-add", "transport-info"):
            return forward
        if from_client:
            offering, other = el.get("from") or self.full_jid, el.get("to", "")
        else:
            offering, other = el.get("from", ""), el.get("to") or self.full_jid
        rewritten = False
        for content in children(jingle, NS_JINGLE, "content"):
            transport = child(content, NS_JINGLE_S5B, "transport")
            if transport is None or not transport.get("sid"):
                continue
            candidates = [c for c in children(transport, NS_JINGLE_S5B, "candidate")
                          if c.get("host") and int_or_none(c.get("port")) is not None]
            hosts = [StreamHost(c.get("jid", ""), c.get("host", ""), int_or_none(c.get("port")) or 0)
                     for c in candidates]
            sid = transport.get("sid", "")
            dst_hash = (transport.get("dstaddr") or socks5_hash(sid, offering, other)).lower()
            if not hosts or self._relayed(hosts, dst_hash, from_client):
                continue
            offer = self._offers.get(sid)
            sending = action != "session-accept"     # an initiator offers a file; a responder accepts one
            sender, receiver = (offering, other) if sending else (other, offering)
            real = tuple(h for h in hosts if not self._is_relay(h.host, h.port))
            self.transfers.expect_bytestream(dst_hash, ExpectedBytestream(
                dst_hash=dst_hash, sid=sid, initiator=offering, target=other, streamhosts=real,
                context=self._bytestream_ctx(sender, receiver, from_client),
                name=offer.name, size=offer.size, content_type=offer.content_type))
            if self.bytestream_relay is not None:
                for c in candidates:
                    c.set("host", self.bytestream_relay[0])
                    c.set("port", str(self.bytestream_relay[1]))
                rewritten = True
        return self._send_rewritten(st, from_client) if rewritten else forward

    def _bytestream_offer(self, st: d.Stanza, query: ET.Element, from_client: bool = True) -> list[Command]:
        """An XEP-0065 streamhost offer, this client's or one the server delivers to it (an outside sender's file
        to our user): SHA1(sid + initiator + target) registered with the real streamhosts and the file's context,
        and with `bytestream_relay` every streamhost rewritten to the relay."""
        el = st.element
        forward = [self._forward(st)] if from_client else [Send(to_client=True, data=st.raw)]
        sid = query.get("sid", "")
        if from_client:
            initiator, target = el.get("from") or self.full_jid, el.get("to", "")
        else:
            initiator, target = el.get("from", ""), el.get("to") or self.full_jid
        hosts = []
        for sh in children(query, NS_BYTESTREAMS, "streamhost"):
            port = int_or_none(sh.get("port"))
            if sh.get("host") and port is not None:
                hosts.append(StreamHost(sh.get("jid", ""), sh.get("host", ""), port))
        dst_hash = socks5_hash(sid, initiator, target)
        if hosts and self._relayed(hosts, dst_hash, from_client):
            return forward
        offer = self._offers.get(sid)
        real = tuple(h for h in hosts if not self._is_relay(h.host, h.port))
        self.transfers.expect_bytestream(dst_hash, ExpectedBytestream(
            dst_hash=dst_hash, sid=sid, initiator=initiator, target=target, streamhosts=real,
            context=self._bytestream_ctx(initiator, target, from_client), name=offer.name, size=offer.size,
            content_type=offer.content_type))
        if self.bytestream_relay is None or not hosts:
            return forward
        relay_host, relay_port = self.bytestream_relay
        for sh in children(query, NS_BYTESTREAMS, "streamhost"):
            sh.set("host", relay_host)
            sh.set("port", str(relay_port))
        return self._send_rewritten(st, from_client)

    # --- server -> client ----------------------------------------------------------------------

    def _server_event(self, event: d.Event) -> list[Command]:
        if isinstance(event, d.XmlError):
            return [self.anomaly(event.kind, f"from the server: {event.detail}", from_client=False),
                    *self._stop(), Close(f"server sent {event.kind}")]
        if isinstance(event, d.StreamOpened):
            self._server_header_seen = True
            self.domain = event.attrs.get("from", "") or self.domain
        if not isinstance(event, d.Stanza):
            return [Send(to_client=True, data=event.raw)]
        el = event.element
        ns, local = split(el.tag)
        out: list[Command] = []
        if ns in NS_SM:
            return self._server_sm(event, ns, local)
        if ns == d.STREAMS_NS and local == "features":
            out += self._server_features(el)
        elif ns == NS_TLS and local == "failure":
            self._starttls_asked = False
        elif ns == NS_TLS and local == "proceed":
            self.tls_pending = True
            return [Send(to_client=True, data=event.raw), StartTls()]
        elif ns == NS_SASL and local == "success":
            self.authenticated = True
        elif ns == NS_SASL2 and local == "success":
            if self.authenticated:
                return [self.anomaly("unsolicited_bind", "a second SASL2 <success> on an authenticated stream: "
                                     "the identity stays", severity="high", from_client=False)]
            self.authenticated = True
            authz = child(el, NS_SASL2, "authorization-identifier")
            if authz is not None and authz.text:
                if "/" in authz.text:
                    self.jid = authz.text.strip()
                else:
                    self.sasl_identity = bare(authz.text.strip())
        elif local == "message" and ns == NS_CLIENT:
            return self._server_message(event)
        elif local == "presence" and (self._entering or self._leaving or b"muc#user" in event.raw) \
                and (bare(el.get("from", "")) in self.rooms or bare(el.get("from", "")) in self._leaving):
            return self._room_presence(event)
        elif local == "iq":
            iq_id = el.get("id")
            itype = el.get("type")
            if itype in ("result", "error") and iq_id is not None \
                    and self._ids.take(iq_id, kind=_SWALLOW) is not None:
                self.dropped(1, from_client=False)      # the sender already got our answer
                return []
            if itype == "result" and child(el, NS_BIND, "bind") is not None:
                return self._server_bind(event)
            if itype == "result":
                replaced = self._server_upload_slot(event)
                if replaced is not None:            # rewritten for the upload relay, or refused
                    return out + replaced
            elif itype == "set":
                return self._server_iq_set(event)
        out.append(Send(to_client=True, data=event.raw))
        return out

    def _server_message(self, st: d.Stanza) -> list[Command]:
        """A message the server delivers to the client: an in-band block of a file sent to the client, or a message
        decided like the client's own (origin FROM_SERVER: from its sender, to the client; for a groupchat, in the
        room, from the occupant room/nick). A copy the server makes of a message for its own user (XEP-0280
        carbons, XEP-0313 archive results: wrapped, from the user's bare JID) is the wrapped message's: from and to
        its parties, and from the client's side when the user sent it."""
        el = st.element
        ibb, oob, scheme = _look_at(el)
        if ibb is not None:
            return self.ibb.data(st, ibb, from_client=False)
        if el.get("type") == "error":
            return [Send(to_client=True, data=st.raw)]
        frm, mtype, to = el.get("from", ""), el.get("type", ""), ""
        for c in el:
            if c.tag in _COPY_WRAPPERS:
                inner = c.find(_FORWARDED_MESSAGE)
                if inner is not None and (not frm or bare(frm) in (self.sender, bare(inner.get("from", "")))):
                    frm, mtype, to = inner.get("from", ""), inner.get("type", ""), inner.get("to", "")
                    _, oob_inner, scheme_inner = _look_at(inner)
                    oob, scheme = oob + oob_inner, scheme or scheme_inner
                break
        refused = self._invitation_refused(el, False)
        if refused:
            return self._refuse_delivery(refused)
        room = bare(frm) if mtype == "groupchat" else ""
        if room in self._leaving:               # a room the gateway took our user out of
            self.dropped(1, from_client=False)
            return []
        walled = self._walled_delivery(room, frm.partition("/")[2]) if room else ""
        if walled:
            return self._refuse_delivery(walled)
        sender = frm if room else bare(frm)             # an occupant is known by its room/nick
        origin = FROM_CLIENT if sender and sender == self.sender else FROM_SERVER
        recipient = bare(to) if to else self.sender
        ctx = self._delivered_ctx(sender, recipient, room, origin)
        out = self._decide_message(st, ctx, oob, scheme, False, (room, el.get("id")) if room else None)
        return self._relay_links(st, ctx, out) if self._link_relays else out

    def _server_iq_set(self, st: d.Stanza) -> list[Command]:
        """An iq the server delivers to the client that may carry a file to it: an in-band bytestream (held here,
        as the client's own are), an SI / Jingle offer (remembered, so the file has its name and size; a Jingle
        offer of a file by its URL is an expected download), an XEP-0065 streamhost offer or XEP-0260 candidates
        (registered and rewritten to the relay, as the client's own), or an XEP-0066 iq naming a URL to fetch
        (recorded as a link, and an expected download)."""
        out: list[Command] = []
        for c in st.element:
            ns, local = split(c.tag)
            if ns == NS_IBB:
                if local == "open":
                    return self.ibb.open(st, c, from_client=False)
                if local == "data":
                    return self.ibb.data(st, c, from_client=False)
                if local == "close":
                    return self.ibb.close(st, c, from_client=False)
            elif ns == NS_SI and local == "si":
                self._offers.remember_si(c)
            elif ns == NS_JINGLE and local == "jingle":
                self._offers.remember_jingle(c)
                shared = jingle_shared_files(c)
                ctx = self._iq_sender_ctx(st.element) if shared else None
                if ctx is not None:
                    self._expect_downloads(ctx, shared)
                return out + self._jingle_s5b(st, c, from_client=False)
            elif ns == NS_BYTESTREAMS and local == "query" and child(c, NS_BYTESTREAMS, "streamhost") is not None:
                return out + self._bytestream_offer(st, c, from_client=False)
            elif ns == NS_OOB_IQ and local == "query":
                url = child(c, NS_OOB_IQ, "url")
                ctx = self._iq_sender_ctx(st.element) if url is not None and (url.text or "").strip() else None
                if ctx is not None:
                    link = (url.text or "").strip()
                    out.append(Link(ctx, link))
                    self._expect_downloads(ctx, [(link, FileOffer(url_name(link)))])
        out.append(Send(to_client=True, data=st.raw))
        return out

    def _iq_sender_ctx(self, el: ET.Element) -> ChatContext | None:
        """The context of a file an iq from the server's side offers the client: from the iq's sender (bare) to the
        client; None when that sender is the client's own account (its other device: not coming in)."""
        sender = bare(el.get("from", ""))
        if not sender or sender == self.sender:
            return None
        return self._delivered_ctx(sender, self.sender, "")

    def _server_features(self, el: ET.Element) -> list[Command]:
        if self.tls or self.authenticated:
            return []
        if child(el, NS_TLS, "starttls") is not None:
            self._starttls_offered = True
            return []
        if child(el, NS_SASL, "mechanisms") is not None or child(el, NS_SASL2, "authentication") is not None:
            return [self.anomaly("no_starttls_offered", "the server offers authentication without STARTTLS "
                                 "on an unencrypted stream", severity="low")]
        return []

    def _server_bind(self, st: d.Stanza) -> list[Command]:
        """A bind result: the identity when it answers the client's pending bind request and comes from the server
        itself; anything else (a result another account addresses to the client, a second one) is an anomaly,
        changes nothing and is dropped."""
        el = st.element
        jid = child(child(el, NS_BIND, "bind"), NS_BIND, "jid")
        frm = el.get("from")
        from_server = not frm or frm in (self.domain, self.sender)
        if self._bind_id is None or el.get("id") != self._bind_id or not from_server \
                or jid is None or not (jid.text or "").strip():
            self.dropped(1, from_client=False)
            return [self.anomaly("unsolicited_bind", "a bind result that does not answer the client's own bind "
                                 "request: the identity stays", severity="high", from_client=False,
                                 id=el.get("id", ""), sender=frm or "",
                                 jid=(jid.text or "").strip() if jid is not None else "")]
        self._bind_id = None
        self.jid = jid.text.strip()
        return [Send(to_client=True, data=st.raw)]

    def _server_upload_slot(self, st: d.Stanza) -> list[Command] | None:
        """An XEP-0363 slot granted to the client: announced (the HTTP carrier scans the PUT to its URL). With an
        upload relay for its origin (XmppLimits.upload_relay), the PUT URL the client gets is the gateway's relay
        listener, so the upload crosses the gateway whatever the client's HTTP route. A slot no relay covers is
        refused with a notice where the client's PUT would go around the gateway (upload_refuse_unrelayed: 'auto',
        the connection came through a reverse listener; or 'always'). None: the stanza goes on as it came."""
        el = st.element
        slot = child(el, NS_UPLOAD, "slot")
        if slot is None:
            return None
        request = self._ids.take(el.get("id", ""), kind=_SLOT)
        put, get = child(slot, NS_UPLOAD, "put"), child(slot, NS_UPLOAD, "get")
        if request is None or put is None or get is None or not put.get("url"):
            return [self.anomaly("unexpected_upload_slot", "an upload slot this connection did not ask for (or "
                                 "without put/get URLs)", id=el.get("id", "")), Send(to_client=True, data=st.raw)]
        name, size, content_type = request
        put_url = put.get("url")
        relayed = upload_relay_url(put_url, self.limits.upload_relay)
        if relayed is None and refuses_unrelayed(self.limits.upload_refuse_unrelayed, self.listener):
            origin = url_origin(put_url)
            text_ = (f"imguard: the upload of {name!r} was refused: its upload service {origin} has no upload relay "
                     "on this gateway, so the file would go around the scan")
            error = (f"<iq type='error' id={attr(el.get('id', ''))}"
                     + (f" from={attr(el.get('from'))}" if el.get("from") else "")
                     + (f" to={attr(el.get('to'))}" if el.get("to") else "")
                     + f"><error type='cancel'><not-allowed xmlns='{NS_STANZAS}'/>"
                     f"<text xmlns='{NS_STANZAS}'>{text(text_)}</text></error></iq>")
            return [self.anomaly("upload_slot_unrouted", f"upload slot on {origin} refused: no upload relay covers "
                                 "it", severity="medium", url=put_url, name=name, listener=self.listener.value),
                    Send(to_client=True, data=error.encode("utf-8"))]          # in place of the slot: same count
        headers = tuple((h.get("name", ""), (h.text or "").strip()) for h in children(put, NS_UPLOAD, "header"))
        info = ExpectedUpload(put_url=put_url, get_url=get.get("url", ""), name=name, size=size,
                              content_type=content_type, context=self.ctx(recipients=(), transfer_mechanism="xep-0363",
                                                                          origin=FROM_CLIENT), put_headers=headers)
        self.transfers.expect_upload(put_url, info)     # the relay listener sees the PUT as addressed upstream
        if relayed is None:
            return None
        if relayed != put_url:
            self.transfers.expect_upload(relayed, info)  # and a proxied client's PUT to the relay, by its own URL
        put.set("url", relayed)
        return [Send(to_client=True, data=serialize(el, ""))]

    def _relay_links(self, st: d.Stanza, ctx: ChatContext, out: list[Command]) -> list[Command]:
        """A message delivered to a client whose HTTP goes around the gateway (XmppLimits.upload_relay_links): each
        link on an upload service a relay covers is rewritten to the relay in the stanza as it is forwarded (bodies,
        XEP-0066 and XEP-0447 URLs, XHTML-IM, forwarded copies), so its download crosses the gateway's relay listener
        and is held and scanned there: an expected download, inbound from its sender, under both URLs. Policy decided
        the message as it was sent; a message not forwarded (refused) is left alone."""
        el = st.element
        if ctx.origin != FROM_SERVER or b"://" not in st.raw:
            return out
        prefix = split(el.tag)[0]
        at = next((i for i, c in enumerate(out) if isinstance(c, Send) and c.to_client
                   and (c.data is st.raw or c.data == serialize(el, prefix))), None)
        if at is None:
            return out
        relayed: dict[str, str] = {}

        def to_relay(match: re.Match) -> str:
            url = match.group(0)
            new = relayed_url(url, self._link_relays) if is_file_url(url) else None
            if new is None:
                return url
            relayed[url] = new
            return new

        for e in el.iter():
            if e.text and "://" in e.text:
                e.text = _URL.sub(to_relay, e.text)
            if e.tail and "://" in e.tail:
                e.tail = _URL.sub(to_relay, e.tail)
            for key, value in list(e.attrib.items()):
                if "://" in value:
                    e.set(key, _URL.sub(to_relay, value))
        if not relayed:
            return out
        file_ctx = ctx.with_(transfer_mechanism="xep-0363-get")
        for url, new in relayed.items():
            info = self.transfers.expected_download(url) or ExpectedDownload(
                url=url, name=url_name(url), size=None, content_type="", context=file_ctx)
            self.transfers.expect_download(info)              # the relay listener sees the GET addressed upstream
            self.transfers.expect_download(info, key=new)     # a proxied client's GET of the relay URL
        return [*out[:at], Send(to_client=True, data=serialize(el, prefix)), *out[at + 1:]]

    # --- building blocks -----------------------------------------------------------------------

    @staticmethod
    def _forward(st: d.Stanza) -> Send:
        return Send(to_client=False, data=st.raw)

    @staticmethod
    def _forward_to(st: d.Stanza, from_client: bool) -> Send:
        """The stanza, as received, to the other side."""
        return Send(to_client=not from_client, data=st.raw)

    def iq_error(self, el: ET.Element, etype: str, condition: str, message: str, to_client: bool = True) -> Send:
        """An error answering the iq `el`, to the side that sent it (the client: "to" its JID)."""
        iq_id = el.get("id", "")
        to = self.full_jid if to_client else el.get("from", "")
        xml = (f"<iq type='error' id={attr(iq_id)}" + (f" from={attr(el.get('to'))}" if el.get("to") else "")
               + (f" to={attr(to)}" if to else "")
               + f"><error type={attr(etype)}><{condition} xmlns='{NS_STANZAS}'/>"
               f"<text xmlns='{NS_STANZAS}'>{text(message)}</text></error></iq>")
        return self.inject(to_client, xml.encode("utf-8"))

    def notice_message(self, to: str, notice: str) -> Send:
        """A plain chat message from the server's domain, for notices that answer no stanza (files)."""
        return self.inject(True, ("<message type='chat'" + (f" from={attr(self.domain)}" if self.domain else "")
                                  + (f" to={attr(to)}" if to else "")
                                  + f"><body>{text(notice)}</body></message>").encode("utf-8"))

    def refusal_message(self, to: str, notice: str) -> Send:
        """A policy-violation error message to `to`, a party on the server's side (the sender of a file the client
        does not get), sent through the server as the client: RFC 6120 §8.3.3.12, which clients show as a failure."""
        self._refusals += 1
        return self.inject(False, (f"<message type='error' id='imguard-refusal-{self._refusals}' to={attr(to)}>"
                                   f"<error type='cancel'><policy-violation xmlns='{NS_STANZAS}'/>"
                                   f"<text xmlns='{NS_STANZAS}'>{text(notice)}</text></error></message>"
                                   ).encode("utf-8"))

    # --- XEP-0198 stream management counts -----------------------------------------------------

    def inject(self, to_client: bool, data: bytes) -> Send:
        """A stanza of our own: the receiving side will count it, the other side never sent it."""
        if to_client:
            self._sm_s2c += 1
        else:
            self._sm_c2s -= 1
        self._sm_store()
        return Send(to_client=to_client, data=data)

    def dropped(self, n: int, from_client: bool = True) -> None:
        """n stanzas of one side that the other will never get."""
        if from_client:
            self._sm_c2s += n
        else:
            self._sm_s2c -= n
        self._sm_store()

    def swallow_answer(self, iq_id: str, from_client: bool) -> None:
        """That side's answer to the iq `iq_id` is dropped when it comes: the asker got ours already."""
        self._ids.expect(iq_id, True, kind=_SWALLOW_CLIENT if from_client else _SWALLOW)

    def _sm_store(self) -> None:
        if self._sm_id:     # so a resumption on another connection can continue with the same offsets
            self.transfers.expect(self._sm_id, (self._sm_c2s, self._sm_s2c), kind=SM_KIND)

    @staticmethod
    def _sm_h(el: ET.Element, offset: int) -> int | None:
        h = int_or_none(el.get("h"))
        return None if h is None else (h + offset) % (1 << 32)

    def _client_sm(self, st: d.Stanza, ns: str, local: str) -> list[Command]:
        el = st.element
        if local == "enable":
            self._sm_c2s = 0                          # the server counts from here
        elif local == "resume":
            self._sm_id = el.get("previd", "")
            offsets = self.transfers.get(self._sm_id, kind=SM_KIND) if self._sm_id else None
            self._sm_c2s, self._sm_s2c = offsets or (0, 0)
        if local in ("a", "resume") and self._sm_s2c:
            h = self._sm_h(el, -self._sm_s2c)          # the client's count -> what the server sent
            if h is not None:
                el.set("h", str(h))
                return [Send(to_client=False, data=serialize(el, ""))]
        return [self._forward(st)]

    def _server_sm(self, st: d.Stanza, ns: str, local: str) -> list[Command]:
        el = st.element
        if local == "enabled":
            self._sm_s2c = 0                          # the client counts from here
            self._sm_id = el.get("id", "") if el.get("resume") in ("true", "1") else ""
            self._sm_store()
        if local in ("a", "resumed") and self._sm_c2s:
            h = self._sm_h(el, self._sm_c2s)           # the server's count -> what the client sent
            if h is not None:
                el.set("h", str(h))
                return [Send(to_client=True, data=serialize(el, ""))]
        return [Send(to_client=True, data=st.raw)]

    def anomaly(self, kind: str, detail: str, ctx: ChatContext | None = None, severity: str | None = None,
                **data: Any) -> Anomaly:
        return Anomaly(ctx or self.ctx(), kind, detail, severity, data)

    def _fail(self, kind: str, detail: str, condition: str, from_client: bool) -> list[Command]:
        """The stream cannot continue: record why, tell the client with a stream error, close."""
        abandoned = self._stop()
        header = b"" if self._server_header_seen else (
            b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
            b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'"
            + (f" from={attr(self.domain)}".encode() if self.domain else b"") + b">")
        error = (f"<stream:error><{condition} xmlns='{NS_STREAM_ERRORS}'/></stream:error></stream:stream>").encode()
        return [self.anomaly(kind, detail, from_client=from_client), *abandoned,
                Send(to_client=True, data=header + error),
                Close(kind)]
