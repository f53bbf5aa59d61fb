"""The SIP session: RFC 3428 MESSAGE through policy, INVITE/SDP MSRP offers into the table. Sans-io.

    session = SipSession(pipeline, transfers, ChatContext(client_address=..., server_address=...))
    session.data_received(True, b"MESSAGE sip:bob@b.example SIP/2.0\\r\\n...\\r\\n\\r\\nthe password is hunter2")
        -> [Send(to_client=False, data=<the same MESSAGE, body masked, Content-Length fixed>)]     (mask)
        -> [Send(to_client=True, data=b"SIP/2.0 403 Forbidden\\r\\nVia: ...Warning: 399 imguard \\"...\\"...")]  (block)

Carriage. SIP runs over UDP, TCP (5060) and TLS (5061, TLS from the first byte). This StreamSession is for
TCP/TLS; `SipDatagramHandler.datagram_received(from_client, data)` takes one UDP datagram and returns the
commands for it (each Send is one datagram). The inline gateway carries it too: mitmproxy's UDP modes
(reverse:udp://, and the transparent modes that deliver UDP) give one connection per client address pair,
each datagram one event; GatewayAddon puts a SipDatagramHandler (registry protocol "sip-udp") on those to
a port mapped to sip, and each Send is written as one datagram.

Messages. A MESSAGE in either direction goes to `checker.check_message(text, ctx)` with protocol "sip", sender =
P-Asserted-Identity if present else the From URI (for our user agent's requests, once the registrar's 2xx to its
own REGISTER (same Call-ID and CSeq) confirmed its address-of-record, that AOR, whatever From or P-Asserted-Identity
claim: a different one is a `sip_sender_mismatch` anomaly; a later 2xx confirming another AOR is an
`identity_change` anomaly and changes nothing), recipients = the To URI (and the Request-URI when it differs),
origin `client` for what the user agent behind the gateway sends and `server` for what the proxy delivers to it
(inbound unless the zones say the sender is inside; `sip_check_inbound_messages` off lets those cross unchecked).
Bodies: text/plain (charset honoured), text/html (tags stripped for policy), message/cpim wrapping either (RFC
3862). Allow/alert: the exact bytes cross. Mask: the body (or the CPIM content) is rewritten and Content-Length
fixed; HTML becomes text/plain. Block/quarantine: the MESSAGE is dropped and the sender gets `403 Forbidden` built
from the request per RFC 3261 §8.2.6 (all Vias, From, To with a tag, Call-ID, CSeq) with `Warning: 399 imguard
"<notice>"` and the notice as a text/plain body; for an inbound one our user (its receiver) is also told, in its
own words, with a notice MESSAGE (below). Status/composing bodies (im-iscomposing, IMDN) pass unchecked; any other
body (an image in a MESSAGE, multipart) is a file: held, `InspectFile` (mechanism "sip-message"), forwarded or
refused (403; inbound, our user told too) on the verdict. A text body (text/plain, text/html, message/cpim) in any
other request (INFO, an INVITE, an unknown method) is checked the same way, so it is no side channel around
MESSAGE. Not checked: other headers, and the free text some XML bodies carry (PIDF <note> in PUBLISH/NOTIFY).

MSRP offers. An INVITE (either direction) whose SDP offers `m=message ... TCP/MSRP` or `TCP/TLS/MSRP`
becomes an `MsrpOffer` in the ExpectedTransfers table (kind "msrp", keys: each endpoint's path key and
(host, port)), with the RFC 5547 file-selector, direction, offerer and answerer; the 2xx answer adds the
answerer's path. A "msrp_offer" event is recorded for each.

Notices. `notice(text)` sends the user a MESSAGE from sip:imguard@imguard.invalid (its responses are
swallowed): the carrier uses it for a `Notify` naming this connection (an MSRP file blocked on its own
connection).

The Subject header of a checked request is checked too (block refuses the message, mask rewrites the header).
An UPDATE (RFC 3311) or re-INVITE with SDP is an offer like an INVITE; a late offer (an INVITE without SDP,
the offer in the 200 OK and the answer in the ACK) is not registered yet.

Framing errors (bad start line, lying or oversized Content-Length, too many headers) are anomalies and close
the connection: the stream cannot be framed any more, and forwarding unframed bytes would let a MESSAGE pass
unchecked. Facts: anomalies (Anomaly), "msrp_offer", "msrp_answer", "sip_notice" (ProtocolEvent). Message
decisions are written by the checker (Pipeline.check_message), not here.
"""

from __future__ import annotations

import collections
import ipaddress
import itertools
import re
import secrets
from typing import Any

from imguard.files.tracker import HeldTransfer, HoldState, Notice, Outcome, Party
from imguard.model import BLOCK, FROM_CLIENT, FROM_SERVER, MASK, ChatContext, Decision, FileReport
from imguard.protocols.base import (Anomaly, Close, Command, OutgoingCommands, ProtocolEvent, Send, StreamSession,
                                    limited_anomaly)
from imguard.protocols.msrp.offer import MsrpOffer, new_offer_id, remember_msrp_offer
from imguard.protocols.sip.message import (KeepAlive, SipFramingError, SipLimits, SipMessage, SipStreamDecoder,
                                           build_response, decode_text, parse_cpim, parse_datagram, quote, uri_of,
                                           with_body, with_header)
from imguard.protocols.sip.sdp import SdpError, msrp_media
from imguard.protocols.sip.text import UNCHECKED_TYPES, masked_body, message_text

GATEWAY_URI = "sip:imguard@imguard.invalid"
NOTICE_BRANCH = "z9hG4bK-imguard-"              # Via branch prefix of the gateway's own requests
BLOCK_STATUS = 403
OFFER_METHODS = ("INVITE", "UPDATE")           # requests whose SDP is an offer (re-INVITEs included), RFC 3311

_ids = itertools.count(1)



def _text_body(msg: SipMessage) -> bool:
    return bool(msg.body) and msg.content_type[0] in ("text/plain", "text/html", "message/cpim")


def _address(media) -> tuple[tuple[str, int], ...]:
    """(c= address, m= port) of an MSRP media line, normalised like find_msrp_offer's lookups."""
    if not media.address or not media.port:
        return ()
    try:
        host = str(ipaddress.ip_address(media.address))
    except ValueError:
        host = media.address.lower()
    return ((host, media.port),)


class SipSession(StreamSession):
    """One SIP connection between a user agent and its proxy (StreamSession). See the module docstring."""

    def __init__(self, checker, transfers, context: ChatContext, limits: SipLimits = SipLimits(),
                 tls_on_connect: bool = False, datagram: bool = False):
        self.checker = checker
        self.transfers = transfers
        self.context = context.with_(protocol="sip")
        self.limits = limits
        self.tls = tls_on_connect
        self.datagram = datagram
        self._decoders = {True: SipStreamDecoder(limits), False: SipStreamDecoder(limits)}
        self.closed = False
        self.anomaly_counts: dict[str, int] = {}
        self.user = ""                  # the user's identity: P-Asserted-Identity or From of their requests
        self.registered = False         # the registrar's 2xx to our user agent's REGISTER confirmed self.user
        self._registering: dict[tuple[str, int], str] = {}     # (Call-ID, CSeq) of a REGISTER -> its AOR
        self.contact = ""               # where the user's UA is (Contact of its requests)
        self._held: dict[str, HeldTransfer] = {}       # MESSAGE bodies that are files, out for inspection
        self._pending: collections.OrderedDict[str, list[MsrpOffer]] = collections.OrderedDict()
        self._notice_seq = itertools.count(1)

    # --- StreamSession ------------------------------------------------------------------------------

    def data_received(self, from_client: bool, data: bytes) -> list[Command]:
        if self.closed:
            return []
        out = OutgoingCommands()
        for item in self._decoders[from_client].feed(data):
            if isinstance(item, SipFramingError):
                self.closed = True
                out.add(self._anomaly(item.kind, item.detail, from_client=from_client,
                                      raw=item.raw[:200].decode("latin-1")), Close(f"SIP framing error: {item.kind}"))
                break
            if isinstance(item, KeepAlive):
                out.send(not from_client, item.raw)
            else:
                self._handle(out, from_client, item)
        return out.cmds

    def tls_started(self) -> list[Command]:
        return []       # SIP has no STARTTLS: TLS on 5061 starts with the connection (tls_on_connect)

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        transfer = self._held.pop(transfer_id, None)
        if transfer is None or self.closed:
            return []
        return transfer.verdict(decision)

    def connection_closed(self, from_client: bool) -> list[Command]:
        pending = self._decoders[from_client].pending
        if pending and not self.closed:
            record = self._anomaly("sip_incomplete_message", "the connection closed in the middle of a SIP message; "
                                   "the partial message was not forwarded", from_client=from_client, size=pending)
            return [record] if record else []
        return []

    # --- for the carrier ----------------------------------------------------------------------------

    def notice(self, text: str) -> list[Command]:
        """A MESSAGE from the gateway to this connection's user (e.g. an MSRP file blocked on its own connection).
        The user agent's response to it is swallowed."""
        if self.closed:
            return []
        target = self.contact or self.user
        if not target:
            return []
        n = next(self._notice_seq)
        body = text.encode("utf-8")
        tag = secrets.token_hex(4)
        transport = "UDP" if self.datagram else ("TLS" if self.tls else "TCP")
        head = (f"MESSAGE {target} SIP/2.0\r\n"
                f"Via: SIP/2.0/{transport} imguard.invalid;branch={NOTICE_BRANCH}{secrets.token_hex(6)}\r\n"
                f"Max-Forwards: 70\r\n"
                f"From: \"imguard\" <{GATEWAY_URI}>;tag={tag}\r\n"
                f"To: <{self.user or target}>\r\n"
                f"Call-ID: {secrets.token_hex(8)}@imguard.invalid\r\n"
                f"CSeq: {n} MESSAGE\r\n"
                f"Content-Type: text/plain;charset=UTF-8\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        return [Send(to_client=True, data=head.encode("utf-8") + body),
                self._event("sip_notice", text=text, target=target)]

    # --- messages -----------------------------------------------------------------------------------

    def _handle(self, out: OutgoingCommands, from_client: bool, msg: SipMessage) -> None:
        if msg.is_request:
            if from_client:
                self._learn_user(msg)
            if (msg.method == "MESSAGE" or _text_body(msg)) and (from_client or self.limits.sip_check_inbound_messages):
                self._message(out, from_client, msg)    # any request's text body: no side channel around MESSAGE
                return
            if msg.method in OFFER_METHODS and msg.body:
                self._invite(out, from_client, msg)
            out.send(not from_client, msg.raw)
            return
        vias = msg.get_all("via")
        if from_client and vias and f"branch={NOTICE_BRANCH}" in vias[0]:
            return          # the user agent answering our notice MESSAGE
        number, method = msg.cseq
        if method == "REGISTER" and not from_client and 200 <= msg.status < 300:
            self._registered(out, self._registering.pop((msg.call_id, number), ""))
        if method in OFFER_METHODS and 200 <= msg.status < 300 and msg.body:
            self._answer(out, from_client, msg)
        out.send(not from_client, msg.raw)

    def _learn_user(self, msg: SipMessage) -> None:
        if msg.method == "REGISTER":
            aor = uri_of(msg.get("to"))
            if aor and len(self._registering) < 16:
                self._registering[(msg.call_id, msg.cseq[0])] = aor
            if not self.registered:
                self.user = aor or self.user
        elif not self.user:
            self.user = self._identity(msg)
        contacts = msg.get_all("contact")
        if contacts and contacts[0] != "*":
            self.contact = uri_of(contacts[0])

    def _registered(self, out: OutgoingCommands, aor: str) -> None:
        """The registrar accepted a REGISTER of ours for `aor`: the first one names our user, for good."""
        if not aor:
            return
        if not self.registered:
            self.user, self.registered = aor, True
        elif aor != self.user:
            out.add(self._anomaly("identity_change", "the registrar confirmed a second address-of-record on this "
                                  "connection: the identity stays", from_client=False, severity="high",
                                  user=self.user, claimed=aor))

    def _sender(self, out: OutgoingCommands, from_client: bool, msg: SipMessage) -> str:
        """Who a request is from: for our registered user agent, its registered AOR (a From or P-Asserted-Identity
        claiming another is an anomaly); else what the request says."""
        claimed = self._identity(msg)
        if not (from_client and self.registered):
            return claimed
        if claimed != self.user:
            out.add(self._anomaly("sip_sender_mismatch", "our user agent's request names another sender than the "
                                  "address-of-record it registered; labelled with the registered one",
                                  from_client=True, user=self.user, claimed=claimed, call_id=msg.call_id))
        return self.user

    @staticmethod
    def _identity(msg: SipMessage) -> str:
        pai = msg.get_all("p-asserted-identity")
        return uri_of(pai[0]) if pai else uri_of(msg.get("from"))

    def _message_ctx(self, out: OutgoingCommands, from_client: bool, msg: SipMessage, **changes: Any) -> ChatContext:
        to = uri_of(msg.get("to"))
        ruri = uri_of(msg.request_uri)
        recipients = tuple(r for r in dict.fromkeys([to, ruri]) if r)
        return self.context.with_(sender=self._sender(out, from_client, msg), recipients=recipients, **changes)

    def _message(self, out: OutgoingCommands, from_client: bool, msg: SipMessage) -> None:
        ctx = self._message_ctx(out, from_client, msg, origin=FROM_CLIENT if from_client else FROM_SERVER)
        subject = msg.get("subject").strip()
        if subject:
            # RFC 3261 §20.36: free text many clients show with the message; checked on its own.
            decision = self.checker.check_message(subject, ctx)
            if decision.action == MASK and decision.masked_text is not None and not decision.blocked:
                clean = re.sub(r"[\x00-\x1f\x7f]+", " ", decision.masked_text)
                rewritten = SipStreamDecoder(self.limits).feed(with_header(msg, "subject", clean))
                if len(rewritten) == 1 and isinstance(rewritten[0], SipMessage):
                    msg = rewritten[0]
                else:       # the mask made it unframeable (past a limit): refused rather than sent unmasked
                    decision = Decision(action=BLOCK, matches=decision.matches, notice=decision.notice)
            if decision.blocked:
                self._refuse(out, from_client, msg, decision, "message subject")
                return
        ctype, params = msg.content_type
        body = msg.body
        if not body.strip() or ctype in UNCHECKED_TYPES:
            out.send(not from_client, msg.raw)
            return
        inner_type, inner_params, inner_body = ctype, params, body
        if ctype == "message/cpim":
            cpim = parse_cpim(body)
            if cpim is None:
                out.add(self._anomaly("sip_bad_cpim", "a message/cpim body without its two header blocks",
                                      from_client=from_client))
                inner_type, inner_params, inner_body = "application/octet-stream", {}, body
            else:
                inner_type, inner_params = cpim.content_type
                inner_body = cpim.content
                if inner_type in UNCHECKED_TYPES:
                    out.send(not from_client, msg.raw)
                    return
        text = message_text(inner_type, inner_params, inner_body)
        if text is None:
            self._hold_file(out, from_client, msg, ctx, inner_body, inner_type)
            return
        decision = self.checker.check_message(text[0], ctx)
        if decision.blocked:
            self._refuse(out, from_client, msg, decision, "message")
        elif decision.action == MASK and decision.masked_text is not None:
            new_body, new_type = masked_body(ctype, params, body, decision.masked_text)
            out.send(not from_client, with_body(msg, new_body, new_type))
            if decision.notice and from_client:
                out.add(*self.notice(decision.notice))
        else:
            out.send(not from_client, msg.raw)

    def _hold_file(self, out: OutgoingCommands, from_client: bool, msg: SipMessage, ctx: ChatContext, data: bytes,
                   claimed: str) -> None:
        """A MESSAGE whose body is a file: the whole message is held (the tracker's one piece: the body to inspect,
        the message to release) until its verdict; a blocked one gets the sender a refusal in SIP's terms."""
        transfer = HeldTransfer(
            f"{self.context.connection_id or 'sip'}-msg-{next(_ids)}", ctx.with_(transfer_mechanism="sip-message"),
            sender_is_client=from_client, kind="sip_message", max_bytes=self.limits.sip_max_message_size,
            size=len(data), claimed_mime=claimed,
            tell=lambda transfer, notice: self._tell_file(from_client, msg, notice))
        out.add(*transfer.append(data, wire=msg.raw))
        out.add(*transfer.inspect())
        if transfer.state is HoldState.INSPECTING:
            self._held[transfer.transfer_id] = transfer

    def _tell_file(self, from_client: bool, msg: SipMessage, notice: Notice) -> list[Command]:
        """A notice in SIP's terms (who is told, and the words, are the tracker's tell rule): our user a notice
        MESSAGE (an allowed file's notice, or an inbound file stopped); a stopped file's sender, on either side,
        the refusal of its MESSAGE with the reason."""
        if notice.party is Party.INSIDE_RECEIVER or notice.outcome is Outcome.NOTICED:
            return self.notice(notice.text)
        out = OutgoingCommands(merge=not self.datagram)
        self._respond_refused(out, from_client, msg, notice.text)
        return out.cmds

    def _refuse(self, out: OutgoingCommands, from_client: bool, msg: SipMessage, decision: Decision, what: str) -> None:
        self._respond_refused(out, from_client, msg, decision.notice or self._default_notice(decision, what, msg))
        if not from_client:
            self._tell_receiver(out, msg, decision, what)

    def _tell_receiver(self, out: OutgoingCommands, msg: SipMessage, decision: Decision, what: str) -> None:
        """An inbound request refused: our user (its receiver) is told in its own words (a rule's notice is written
        for a sender), with a notice MESSAGE, when the session knows where it is."""
        words = {"block": "blocked", "quarantine": "quarantined"}
        why = "; ".join(m.title or m.rule_id for m in decision.matches) or "policy"
        notice = self.notice(f"A {what} from {self._identity(msg)} was {words.get(decision.action, 'blocked')} "
                             f"by imguard: {why}")
        out.add(*notice)

    def _respond_refused(self, out: OutgoingCommands, from_client: bool, msg: SipMessage, text: str) -> None:
        """The sender's answer to a refused request: BLOCK_STATUS with the reason in a Warning and the body."""
        response = build_response(msg, BLOCK_STATUS, to_tag=secrets.token_hex(4),
                                  extra_headers=[("Warning", f"399 imguard {quote(text)}"), ("Server", "imguard")],
                                  body=text.encode("utf-8"))
        out.send(from_client, response)

    @staticmethod
    def _default_notice(decision: Decision, what: str, msg: SipMessage) -> str:
        words = {"block": "blocked", "quarantine": "quarantined"}
        why = "; ".join(m.title or m.rule_id for m in decision.matches) or "policy"
        to = uri_of(msg.get("to"))
        return f"Your {what} to {to} was {words.get(decision.action, 'blocked')} by imguard: {why}"

    # --- MSRP offers --------------------------------------------------------------------------------

    def _sdp(self, out: OutgoingCommands, from_client: bool, msg: SipMessage):
        ctype, _ = msg.content_type
        if ctype != "application/sdp":
            return None
        try:
            return msrp_media(decode_text(msg.body))
        except SdpError as e:
            out.add(self._anomaly(e.kind, e.detail, from_client=from_client, call_id=msg.call_id))
            return None

    def _invite(self, out: OutgoingCommands, from_client: bool, msg: SipMessage) -> None:
        media = self._sdp(out, from_client, msg)
        if not media:
            return
        offerer = self._sender(out, from_client, msg)
        answerer = uri_of(msg.get("to"))
        offers = []
        for m in media:
            direction = {"sendonly": "push", "recvonly": "pull"}.get(m.direction, "push" if m.file else "")
            sender, receiver = (answerer, offerer) if direction == "pull" else (offerer, answerer)
            ctx = self.context.with_(protocol="msrp", sender=sender, recipients=(receiver,),
                                     conversation=msg.call_id, transfer_mechanism="msrp" if m.file else "")
            offer = MsrpOffer(offer_id=new_offer_id(self.context.connection_id), call_id=msg.call_id,
                              offerer=offerer, answerer=answerer, offer_path=m.path, tls=m.tls,
                              accept_types=m.accept_types, file=m.file, file_direction=direction if m.file else "",
                              file_transfer_id=m.file_transfer_id, outbound=from_client, context=ctx,
                              addresses=_address(m))
            remember_msrp_offer(self.transfers, offer, self.limits.sip_msrp_offer_ttl)
            offers.append(offer)
            out.add(self._event("msrp_offer", category="file" if m.file else "session", ctx=ctx, **offer.to_dict()))
        self._pending[msg.call_id] = offers
        self._pending.move_to_end(msg.call_id)
        while len(self._pending) > self.limits.sip_max_pending_invites:
            self._pending.popitem(last=False)

    def _answer(self, out: OutgoingCommands, from_client: bool, msg: SipMessage) -> None:
        offers = self._pending.get(msg.call_id)
        if not offers:
            return
        media = self._sdp(out, from_client, msg)
        if not media:
            return
        answered = []
        for offer, m in zip(offers, media, strict=False):     # an answer may carry fewer media lines
            offer = offer.with_answer(m.path, tls=offer.tls or m.tls, address=next(iter(_address(m)), None))
            remember_msrp_offer(self.transfers, offer, self.limits.sip_msrp_offer_ttl)
            answered.append(offer)
            out.add(self._event("msrp_answer", category="session", ctx=offer.context, **offer.to_dict()))
        self._pending[msg.call_id] = answered

    # --- records ------------------------------------------------------------------------------------

    def _anomaly(self, kind: str, detail: str, **data: Any) -> Anomaly | None:
        """An anomaly record; past sip_max_anomalies_per_kind of one kind on this connection, only counted."""
        return limited_anomaly(self.anomaly_counts, self.limits.sip_max_anomalies_per_kind,
                               self.context.with_(sender=self.user), kind, detail, **data)

    def _event(self, action: str, category: str = "session", ctx: ChatContext | None = None,
               **data: Any) -> ProtocolEvent:
        ctx = ctx or self.context.with_(sender=self.user)
        return ProtocolEvent("sip", action, ctx, category, data)


class SipDatagramHandler(StreamSession):
    """SIP over UDP: one datagram in, the commands for it out (each Send is one datagram to write).

    Same policy as SipSession. A datagram that is not a SIP message is an anomaly and dropped (UDP has no
    stream to lose: later datagrams are still handled). The carrier answers InspectFile with file_verdict."""

    def __init__(self, checker, transfers, context: ChatContext, limits: SipLimits = SipLimits()):
        self.session = SipSession(checker, transfers, context, limits, datagram=True)

    def datagram_received(self, from_client: bool, data: bytes) -> list[Command]:
        s = self.session
        out = OutgoingCommands(merge=False)
        if data.strip(b"\r\n") == b"":
            out.send(not from_client, data)         # keep-alive
            return out.cmds
        try:
            msg = parse_datagram(data, s.limits)
        except SipFramingError as e:
            out.add(s._anomaly(e.kind, e.detail, from_client=from_client, size=len(data)))
            return out.cmds
        s._handle(out, from_client, msg)
        return out.cmds

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        return self.session.file_verdict(transfer_id, report, decision)

    def notice(self, text: str) -> list[Command]:
        return self.session.notice(text)

    # The StreamSession contract, for a carrier that delivers each datagram as one DataReceived and writes
    # each Send as one datagram (mitmproxy's UDP connections do).
    data_received = datagram_received

    def tls_started(self) -> list[Command]:
        return []

    def connection_closed(self, from_client: bool) -> list[Command]:
        return []
