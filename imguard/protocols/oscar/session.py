"""The OSCAR (AIM/ICQ) client-to-server session: identity, ICBM message policy, SendFile rendezvous.
Sans-io.

    session = OscarSession(checker, transfers, ChatContext(client_address=..., server_address=...))
    session.data_received(True, <FLAP ch2 SNAC(04,06) ICBM ch1 "the password is hunter2">)
        -> [Send(to_client=False, data=<the same frame>)]                                  (allow)
        -> [Send(to_client=False, data=<the frame with the text rewritten, TLV/FLAP lengths fixed>)]  (mask)
        -> [Send(to_client=True, data=<FLAP ch2 SNAC(04,07) ICBM from "imguard" with the notice>)]    (block)

One class serves the login (BUCP/authorizer) and the BOS connection.

Identity (the screen name, or the UIN for ICQ): the sign-on TLV 0x0001 (FLAP channel 1, old-style
login) or SNAC(17,02)/(17,06) TLV 0x0001 name it tentatively; the authorizer's answer (SNAC(17,03), or
FLAP channel 4 for the old login) confirms it and carries the BOS cookie (TLV 0x0006), which is
remembered in the shared ExpectedTransfers table (kind "oscar_cookie", key the cookie in hex) so the
BOS connection that signs on with that cookie (FLAP channel 1 TLV 0x0006) knows whose it is; the BOS
server's self-info SNAC(01,0F) then confirms it again.

Messages: ICBM channel 1 text, in both directions: client -> server SNAC(04,06) (sender: us,
recipient: the screen name in the ICBM) and server -> client SNAC(04,07) (sender: the screen name,
recipient: us). The text fragments (0x0101) are decoded by their charset (ASCII/Windows code page,
ISO-8859-1, UCS-2BE; bad UTF-16 is an anomaly and read with replacement) and HTML is stripped for
policy. ICQ channel 4 (TLV 0x0005: UIN, type, flags, text) plain and URL messages are checked too.
- allow/alert: the exact frame crosses;
- mask: the text fragments are replaced by one with `decision.masked_text` (HTML-escaped inside
  <HTML><BODY> when the original was HTML; in the original charset when it can carry the text, else
  UCS-2BE; the capabilities fragment and the other TLVs kept), and the fragment, TLV and FLAP lengths
  are recomputed;
- block/quarantine: the frame is dropped. The notice is an *incoming ICBM from the screen name
  "imguard"* (channel 1, SNAC(04,07)) with the text: every AIM/ICQ client shows that as a chat window,
  while a SNAC(04,01) error only gives a numeric code some clients ignore. An inbound message
  blocked is dropped and our client gets a notice naming its sender, in its own words (a rule's notice is
  written for a sender: shown only to our own senders, also after a mask).

FLAP sequence numbers: a dropped or injected frame would leave a gap or a duplicate in the 16-bit
sequence, which servers and clients may check. The session keeps an offset per direction and rewrites
the sequence of every later frame, so each side sees a continuous sequence. Frames are byte-exact
until the first drop or injection on their direction; from then on only the 2 sequence bytes differ.

SendFile (ICBM channel 2, capability 09461343-4C7F-11D1-8222-444553540000): a proposal (type 0) with
TLV 0x2711 (name, size, count) becomes an `OftOffer` in the shared table, kind "oft", under its cookie
(hex) and under (ip, port) for each announced address (client IP 0x0003, verified IP 0x0004, or the
proxy IP 0x0002 with the use-proxy flag 0x0010) and the port 0x0005. A later proposal with the same
cookie (request number 2/3: the receiver listens, or the AOL proxy is used) adds its addresses to the
same offer. The carrier puts an `OftSession` (imguard.protocols.oscar.oft) on the connection. An offer
over `oscar_max_held_bytes` is dropped with a notice. Files offered *to* our client are registered the
same way. Direct IM and Get File proposals (peer connections the gateway cannot inspect) are dropped
with a notice ("oscar_peer_refused"); other rendezvous (voice, games, buddy icons) cross.
With `side_relay` (the gateway's side relay: `.host` an IPv4 address, `.allocate(offer) -> port`, as IRC's
DccRelay), every direct proposal crossing in either direction (request 1 from the offerer, and request 2,
the receiver listening: "reverse connect") is rewritten to host:allocate(offer): client IP 0x0003, verified
IP 0x0004 (when present), port 0x0005 and their checks 0x0016/0x0017. The offer waits under that relay key
with the proposal's real address (verified IP, else client IP) as `real_address`. A proposal already naming
the relay (both parties behind the gateway) crosses unchanged. Proxied proposals (0x0010: both clients
connect out to AOL's proxy, ars.oscar.aol.com) are not rewritten: they are caught by their destination.

Anomalies (at most `oscar_max_anomalies_per_kind` per kind): framing errors (bad FLAP start, a length
over `oscar_max_frame_size`: the connection closes), truncated frames at close, malformed SNACs, TLVs
and ICBMs (an outgoing ICBM we cannot read is dropped: fail closed), bad UTF-16, unknown SNAC families
(recorded once per family, forwarded). Events: "oscar_login", "oscar_signon", "oft_offer", "oft_cancel",
"oscar_file_refused", "oscar_peer_refused".
"""

from __future__ import annotations

import html
import ipaddress
import itertools
import re
import struct
from dataclasses import dataclass, field, replace
from typing import Any

from imguard.model import FROM_CLIENT, FROM_SERVER, MASK, ChatContext, Decision, FileReport
from imguard.protocols.base import (Anomaly, Close, Command, OutgoingCommands, ProtocolEvent, StreamSession,
                                    block_words, limited_anomaly)
from imguard.protocols.oscar.decoder import (CAP_DIRECTIM, CAP_GETFILE, CAP_SENDFILE, CH_SIGNOFF, CH_SIGNON,
                                             CH_SNAC, CHARSET_ASCII, ICBM, ICBM_INCOMING, ICBM_SEND, KNOWN_FAMILIES,
                                             RV_CANCEL, RV_PROPOSE, Flap, FlapDecoder, FramingError, Icbm, OscarError,
                                             OscarLimits, Snac, build_flap, build_snac, build_text_fragments,
                                             build_tlvs, decode_text, is_html, parse_fragments, parse_icbm,
                                             parse_rendezvous, parse_snac, parse_tlvs, strip_html, tlv)

GATEWAY_NAME = "imguard"
OFT_KIND = "oft"                    # ExpectedTransfers kind of SendFile offers; keys: cookie hex, (ip, port)
COOKIE_KIND = "oscar_cookie"        # BOS sign-on cookie (hex) -> screen name
PEER_CAPS = {CAP_DIRECTIM: "Direct IM", CAP_GETFILE: "Get File"}
_ids = itertools.count(1)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]+")


@dataclass(frozen=True)
class OftOffer:
    """A SendFile rendezvous: what the expected OFT connection will carry and for whom."""
    offer_id: str
    cookie: str                         # the ICBM/rendezvous cookie, hex
    name: str                           # never used as a path
    size: int | None                    # total size of all files
    file_count: int
    sender: str                         # screen names
    receiver: str
    addresses: tuple[tuple[str, int], ...] = ()
    use_proxy: bool = False
    outbound: bool = True               # offered by the gateway's own client
    context: ChatContext = field(default_factory=ChatContext)   # connection_id = the BOS connection's
    relay_host: str = ""                # the side relay this proposal was rewritten to ("": not rewritten)
    relay_port: int = 0

    @property
    def real_address(self) -> tuple[str, int]:
        """Where the carrier connects on to: the (first) announced address."""
        return self.addresses[0] if self.addresses else ("", 0)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.offer_id, "cookie": self.cookie, "name": self.name, "size": self.size,
                "file_count": self.file_count, "sender": self.sender, "receiver": self.receiver,
                "addresses": [f"{h}:{p}" for h, p in self.addresses], "use_proxy": self.use_proxy,
                "outbound": self.outbound, "relay_host": self.relay_host, "relay_port": self.relay_port}


def remember_offer(transfers, offer: OftOffer, ttl: float) -> None:
    if transfers is None:
        return
    transfers.expect(offer.cookie, offer, kind=OFT_KIND, ttl=ttl)
    for address in offer.addresses:
        transfers.expect(address, offer, kind=OFT_KIND, ttl=ttl)


def find_oft_offer(transfers, cookie: bytes | str | None = None, host: str = "", port: int = 0) -> OftOffer | None:
    """For the carrier (and OftSession): the offer by cookie, else by the address connected to."""
    if transfers is None:
        return None
    if cookie:
        key = cookie.hex() if isinstance(cookie, (bytes, bytearray)) else cookie.lower()
        found = transfers.get(key, kind=OFT_KIND)
        if found is not None:
            return found
    if host and port:
        return transfers.get((host, int(port)), kind=OFT_KIND)
    return None


def _normal(screen_name: str) -> str:
    """A screen name as AIM compares them: case and spaces do not count."""
    return screen_name.replace(" ", "").lower()


class OscarSession(StreamSession):
    """One OSCAR client connection (StreamSession). See the module docstring."""

    def __init__(self, checker, transfers, context: ChatContext, limits: OscarLimits = OscarLimits(),
                 side_relay: Any = None):
        self.checker = checker
        self.transfers = transfers
        self.side_relay = side_relay    # .host, .allocate(offer) -> port: SendFile proposals rewritten to it
        self.context = context.with_(protocol="oscar")
        self.limits = limits
        self._decoders = {True: FlapDecoder(limits), False: FlapDecoder(limits)}
        self.closed = False
        self.anomaly_counts: dict[str, int] = {}
        self.screen_name = ""
        self.confirmed = False
        self.unknown_families: set[int] = set()
        self._shift = {True: 0, False: 0}           # by direction of travel (from_client): added to seq
        self._last_seq: dict[bool, int | None] = {True: None, False: None}    # by to_client: last seq sent
        self._offers: dict[str, OftOffer] = {}
        self._notice_ids = itertools.count(1)

    def _ctx(self, **changes: Any) -> ChatContext:
        base = {"sender": self.screen_name}
        base.update(changes)
        return self.context.with_(**base)

    # --- StreamSession ------------------------------------------------------------------------------

    def data_received(self, from_client: bool, data: bytes) -> list[Command]:
        if self.closed:
            return []
        out = OutgoingCommands()
        for ev in self._decoders[from_client].feed(data):
            if isinstance(ev, FramingError):
                self.closed = True
                out.add(self._anomaly(ev.kind, ev.detail, from_client=from_client, size=ev.size),
                        Close(f"OSCAR framing: {ev.kind}"))
                break
            try:
                self._frame(out, from_client, ev)
            except OscarError as e:
                out.add(self._anomaly(e.kind, e.detail, from_client=from_client, channel=ev.channel))
                self._forward(out, from_client, ev)
        return out.cmds

    def tls_started(self) -> list[Command]:
        return []

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        return []           # OFT files are held by OftSession on their own connection

    def connection_closed(self, from_client: bool) -> list[Command]:
        pending = self._decoders[from_client].pending
        if pending and not self.closed:
            rec = self._anomaly("truncated_frame", "the connection closed in the middle of a FLAP frame (a length "
                                "larger than the data that came); not forwarded", from_client=from_client,
                                size=len(pending))
            return [rec] if rec else []
        return []

    # --- for the carrier ----------------------------------------------------------------------------

    def notice(self, text: str) -> list[Command]:
        """A notice from the gateway to this connection's user: an incoming ICBM from "imguard"."""
        if self.closed:
            return []
        out = OutgoingCommands()
        self._inject_notice(out, text)
        return out.cmds

    # --- frames -------------------------------------------------------------------------------------

    def _forward(self, out: OutgoingCommands, from_client: bool, flap: Flap, data: bytes | None = None) -> None:
        seq = (flap.seq + self._shift[from_client]) & 0xFFFF
        if data is None and seq == flap.seq:
            raw = flap.raw
        else:
            raw = build_flap(flap.channel, seq, flap.data if data is None else data)
        self._last_seq[not from_client] = seq
        out.send(not from_client, raw)

    def _drop(self, from_client: bool) -> None:
        self._shift[from_client] -= 1

    def _mask_fits(self, out: OutgoingCommands, from_client: bool, text: str) -> bool:
        """A masked text must fit a frame the peer accepts; if not, the message is dropped (fail closed)."""
        if len(text) * 2 + 512 <= self.limits.oscar_max_frame_size:
            return True
        out.add(self._anomaly("mask_too_large", f"the masked text ({len(text)} characters) does not fit a FLAP "
                              "frame; the message was dropped", from_client=from_client))
        self._inject_notice(out, "imguard: a message was rewritten by policy and became too long to send; "
                                 "it was dropped")
        self._drop(from_client)
        return False

    def _inject_notice(self, out: OutgoingCommands, text: str) -> None:
        text = (_CONTROL.sub(" ", text).strip() or GATEWAY_NAME)[:1000]     # ICBMs carry ~2500 characters
        cookie = b"imgd" + struct.pack(">I", next(self._notice_ids))
        name = GATEWAY_NAME.encode()
        user_info = struct.pack(">HH", 0, 1) + build_tlvs([(0x0001, b"\x00\x10")])
        body = "<HTML><BODY>" + html.escape(text, quote=False) + "</BODY></HTML>"
        data = (cookie + struct.pack(">HB", 1, len(name)) + name + user_info +
                build_tlvs([(0x0002, build_text_fragments(body, CHARSET_ASCII))]))
        snac = build_snac(ICBM, ICBM_INCOMING, 0, 0, data)
        last = self._last_seq[True]
        seq = ((last if last is not None else 0) + 1) & 0xFFFF
        self._last_seq[True] = seq
        self._shift[False] += 1
        out.send(True, build_flap(CH_SNAC, seq, snac))

    def _anomaly(self, kind: str, detail: str, **data: Any) -> Anomaly | None:
        return limited_anomaly(self.anomaly_counts, self.limits.oscar_max_anomalies_per_kind, self._ctx(),
                               kind, detail, **data)

    def _event(self, action: str, category: str = "session", ctx: ChatContext | None = None,
               **data: Any) -> ProtocolEvent:
        return ProtocolEvent("oscar", action, ctx or self._ctx(), category, data)

    def _frame(self, out: OutgoingCommands, from_client: bool, flap: Flap) -> None:
        if flap.channel == CH_SIGNON and len(flap.data) >= 4:
            tlvs, _ = parse_tlvs(flap.data[4:])
            self._signon(out, from_client, tlvs)
        elif flap.channel == CH_SIGNOFF and not from_client and flap.data:
            self._login_reply(out, parse_tlvs(flap.data)[0])
        elif flap.channel == CH_SNAC:
            snac = parse_snac(flap.data)
            if snac.family not in KNOWN_FAMILIES and snac.family not in self.unknown_families:
                self.unknown_families.add(snac.family)
                out.add(self._anomaly("unknown_snac_family", f"SNAC family 0x{snac.family:04x} (subtype "
                                      f"0x{snac.subtype:04x}); forwarded", from_client=from_client,
                                      family=snac.family))
            if snac.family == ICBM and snac.subtype in (ICBM_SEND, ICBM_INCOMING) and \
                    from_client == (snac.subtype == ICBM_SEND):
                self._icbm(out, from_client, flap, snac)
                return
            if snac.family == 0x0017 and from_client and snac.subtype in (0x0002, 0x0006):
                name = tlv(parse_tlvs(snac.data)[0], 0x0001)
                if name and not self.confirmed:
                    self.screen_name = name.decode("utf-8", "replace")
            elif snac.family == 0x0017 and not from_client and snac.subtype == 0x0003:
                self._login_reply(out, parse_tlvs(snac.data)[0])
            elif snac.family == 0x0001 and not from_client and snac.subtype == 0x000F and snac.data:
                n = snac.data[0]
                name = snac.data[1:1 + n].decode("utf-8", "replace")
                if name and self.confirmed and _normal(name) != _normal(self.screen_name):
                    out.add(self._anomaly("identity_change", "the server's self-info names another screen name: "
                                          "the identity stays", from_client=False, severity="high",
                                          screen_name=self.screen_name, claimed=name))
                elif name and (name != self.screen_name or not self.confirmed):
                    self.screen_name, self.confirmed = name, True     # (a formatting change: 'a lice' -> 'A Lice')
                    out.add(self._event("oscar_signon", screen_name=name))
        self._forward(out, from_client, flap)

    def _signon(self, out: OutgoingCommands, from_client: bool, tlvs: list[tuple[int, bytes]]) -> None:
        if not from_client:
            return
        name = tlv(tlvs, 0x0001)
        if name and not self.confirmed:
            self.screen_name = name.decode("utf-8", "replace")
        cookie = tlv(tlvs, 0x0006)
        if cookie and self.transfers is not None:
            known = self.transfers.get(cookie.hex(), kind=COOKIE_KIND)
            if known:
                self.screen_name = known
                self.confirmed = True
                out.add(self._event("oscar_signon", screen_name=known, by="bos_cookie"))

    def _login_reply(self, out: OutgoingCommands, tlvs: list[tuple[int, bytes]]) -> None:
        name, cookie, bos = tlv(tlvs, 0x0001), tlv(tlvs, 0x0006), tlv(tlvs, 0x0005)
        if not name or not cookie:
            return                          # an error reply (TLV 0x0008) or a sign-off
        if self.confirmed and _normal(name.decode("utf-8", "replace")) != _normal(self.screen_name):
            out.add(self._anomaly("identity_change", "a second login reply naming another screen name: the "
                                  "identity stays", from_client=False, severity="high", screen_name=self.screen_name,
                                  claimed=name.decode("utf-8", "replace")))
            return
        self.screen_name = name.decode("utf-8", "replace")
        self.confirmed = True
        if self.transfers is not None:
            self.transfers.expect(cookie.hex(), self.screen_name, kind=COOKIE_KIND,
                                  ttl=self.limits.oscar_transfer_ttl)
        out.add(self._event("oscar_login", screen_name=self.screen_name,
                            bos=(bos or b"").decode("latin-1")))

    # --- ICBM ---------------------------------------------------------------------------------------

    def _icbm(self, out: OutgoingCommands, from_client: bool, flap: Flap, snac: Snac) -> None:
        try:
            icbm = parse_icbm(snac.data, incoming=not from_client)
        except OscarError as e:
            if from_client:             # fail closed: the server might read what we cannot
                out.add(self._anomaly(e.kind, e.detail + "; dropped", from_client=True))
                self._drop(True)
                return
            out.add(self._anomaly(e.kind, e.detail, from_client=False))
            self._forward(out, from_client, flap)
            return
        if from_client:
            sender, recipients = self.screen_name, (icbm.screen_name,)
        else:
            sender, recipients = icbm.screen_name, ((self.screen_name,) if self.screen_name else ())
        if icbm.channel == 1:
            self._channel1(out, from_client, flap, snac, icbm, sender, recipients)
        elif icbm.channel == 2:
            self._channel2(out, from_client, flap, snac, icbm, sender, recipients)
        elif icbm.channel == 4:
            self._channel4(out, from_client, flap, snac, icbm, sender, recipients)
        else:
            self._forward(out, from_client, flap)

    def _rebuild(self, snac: Snac, icbm: Icbm, t: int, value: bytes) -> bytes:
        tlvs = [(k, value if k == t else v) for k, v in icbm.tlvs]
        return snac.header() + icbm.prefix + build_tlvs(tlvs)

    def _decide(self, out: OutgoingCommands, from_client: bool, text: str, sender: str,
                recipients: tuple[str, ...]) -> Decision | None:
        """Policy for one message; a blocked one is answered here (None returned: drop it)."""
        if not text.strip():
            return Decision()
        decision = self.checker.check_message(text, self._ctx(sender=sender, recipients=recipients,
                                                              origin=FROM_CLIENT if from_client else FROM_SERVER))
        if decision.blocked:
            action, why = block_words(decision)
            if from_client:
                to = f" to {', '.join(recipients)}" if recipients else ""
                self._inject_notice(out, decision.notice or f"Your message{to} was {action} by imguard: {why}")
            else:       # our client is the receiver: told in its own words (a rule's notice is for a sender)
                self._inject_notice(out, f"A message from {sender} was {action} by imguard: {why}")
            self._drop(from_client)
            return None
        return decision

    def _channel1(self, out: OutgoingCommands, from_client: bool, flap: Flap, snac: Snac, icbm: Icbm, sender: str,
                  recipients: tuple[str, ...]) -> None:
        value = tlv(icbm.tlvs, 0x0002)
        if value is None:
            self._forward(out, from_client, flap)
            return
        try:
            fragments = parse_fragments(value)
        except OscarError as e:
            out.add(self._anomaly(e.kind, e.detail + ("; dropped" if from_client else ""), from_client=from_client))
            if from_client:
                self._drop(True)
            else:
                self._forward(out, from_client, flap)
            return
        parts, first_charset, html_seen = [], None, False
        for fid, _ver, data in fragments:
            if fid != 0x01 or len(data) < 4:
                continue
            charset = struct.unpack_from(">H", data)[0]
            text, ok = decode_text(charset, data[4:])
            if not ok:
                out.add(self._anomaly("bad_utf16", "a UCS-2BE message text that is not valid UTF-16 (read with "
                                      "replacement characters)", from_client=from_client))
            first_charset = charset if first_charset is None else first_charset
            html_seen = html_seen or is_html(text)
            parts.append(strip_html(text))
        decision = self._decide(out, from_client, "".join(parts), sender, recipients)
        if decision is None:
            return
        if decision.action == MASK and decision.masked_text is not None and first_charset is not None:
            if not self._mask_fits(out, from_client, decision.masked_text):
                return
            body = decision.masked_text
            if html_seen:       # AIM renders text as HTML: escape it, and say it is HTML
                body = "<HTML><BODY>" + html.escape(body, quote=False).replace("\n", "<BR>") + "</BODY></HTML>"
            caps = next((d for fid, _v, d in fragments if fid == 0x05), b"\x01")
            new_value = build_text_fragments(body, first_charset, caps)
            self._forward(out, from_client, flap, self._rebuild(snac, icbm, 0x0002, new_value))
            if decision.notice and from_client:     # a rule's notice is for the sender, ours only
                self._inject_notice(out, decision.notice)
            return
        self._forward(out, from_client, flap)

    def _channel4(self, out: OutgoingCommands, from_client: bool, flap: Flap, snac: Snac, icbm: Icbm, sender: str,
                  recipients: tuple[str, ...]) -> None:
        value = tlv(icbm.tlvs, 0x0005)
        if value is None or len(value) < 8:
            self._forward(out, from_client, flap)
            return
        uin, mtype, mflags, n = struct.unpack_from("<IBBH", value)
        raw = value[8:8 + n].rstrip(b"\x00")
        if mtype not in (0x01, 0x04):           # plain text, URL ("description\xfeurl")
            self._forward(out, from_client, flap)
            return
        text = raw.decode("utf-8") if _is_utf8(raw) else raw.decode("cp1252", "replace")
        decision = self._decide(out, from_client, text.replace("\xfe", " "), sender, recipients)
        if decision is None:
            return
        if decision.action == MASK and decision.masked_text is not None:
            if not self._mask_fits(out, from_client, decision.masked_text):
                return
            new = decision.masked_text.encode("utf-8") + b"\x00"
            new_value = struct.pack("<IBBH", uin, mtype, mflags, len(new)) + new
            self._forward(out, from_client, flap, self._rebuild(snac, icbm, 0x0005, new_value))
            return
        self._forward(out, from_client, flap)

    # --- rendezvous ---------------------------------------------------------------------------------

    def _channel2(self, out: OutgoingCommands, from_client: bool, flap: Flap, snac: Snac, icbm: Icbm, sender: str,
                  recipients: tuple[str, ...]) -> None:
        value = tlv(icbm.tlvs, 0x0005)
        if value is None:
            self._forward(out, from_client, flap)
            return
        try:
            rv = parse_rendezvous(value)
        except OscarError as e:
            out.add(self._anomaly(e.kind, e.detail, from_client=from_client))
            self._forward(out, from_client, flap)
            return
        if rv.capability in PEER_CAPS and rv.type == RV_PROPOSE:
            # Direct IM and Get File open a peer connection carrying messages or files the gateway cannot
            # inspect (Direct IM has its own framing with inline images): refused, with a notice.
            what = PEER_CAPS[rv.capability]
            out.add(self._event("oscar_peer_refused", category="file", capability=what, cookie=rv.cookie.hex(),
                                outbound=from_client, peer=icbm.screen_name))
            who = f"with {icbm.screen_name}"
            self._inject_notice(out, f"imguard does not allow {what} connections ({who}): they cannot be "
                                     "inspected. Send messages and files the usual way.")
            self._drop(from_client)
            return
        if rv.capability != CAP_SENDFILE:
            self._forward(out, from_client, flap)
            return
        cookie = rv.cookie.hex()
        known = self._offers.get(cookie)
        if rv.type == RV_CANCEL:
            out.add(self._event("oft_cancel", category="file", cookie=cookie))
            self._forward(out, from_client, flap)
            return
        if rv.type != RV_PROPOSE:
            self._forward(out, from_client, flap)
            return
        if self._relayed_already(rv):       # rewritten by the other party's session (both behind the gateway)
            self._forward(out, from_client, flap)
            return
        addresses = []
        for ip in ((rv.proxy_ip,) if rv.use_proxy else (rv.client_ip, rv.verified_ip)):
            if ip and ip != "0.0.0.0" and rv.port and (ip, rv.port) not in addresses:
                addresses.append((ip, rv.port))
        if known is not None:
            offer = replace(known, addresses=tuple(dict.fromkeys(known.addresses + tuple(addresses))),
                            use_proxy=known.use_proxy or rv.use_proxy)
        else:
            info = rv.file_info()
            if info is None:
                out.add(self._anomaly("rendezvous_without_file_info", "a SendFile proposal without TLV 0x2711",
                                      from_client=from_client, cookie=cookie))
            name, size, count = info if info is not None else ("", None, 0)
            file_sender = sender
            file_receiver = recipients[0] if recipients else ""
            if size is not None and size > self.limits.oscar_max_held_bytes:
                ctx = self._ctx(sender=file_sender, recipients=(file_receiver,), transfer_mechanism="oft")
                out.add(self._event("oscar_file_refused", category="file", ctx=ctx, reason="too_large", name=name,
                                    size=size))
                who = f"to {file_receiver}" if from_client else f"from {file_sender}"
                self._inject_notice(out, f"The file {name!r} ({size} bytes) {who} is larger than "
                                         f"{self.limits.oscar_max_held_bytes} bytes and cannot be inspected; "
                                         "imguard did not pass the offer on")
                self._drop(from_client)
                return
            offer = OftOffer(offer_id=f"{self.context.connection_id or 'oft'}-{next(_ids)}", cookie=cookie,
                             name=name, size=size, file_count=count, sender=file_sender, receiver=file_receiver,
                             addresses=tuple(addresses), use_proxy=rv.use_proxy, outbound=from_client,
                             context=self._ctx(sender=file_sender, recipients=(file_receiver,),
                                               transfer_mechanism="oft"))
        self._offers[cookie] = offer
        while len(self._offers) > 256:
            self._offers.pop(next(iter(self._offers)))
        data = None
        if self.side_relay is not None and addresses and not rv.use_proxy:
            real = next(((ip, rv.port) for ip in (rv.verified_ip, rv.client_ip) if ip and ip != "0.0.0.0"))
            try:
                port = int(self.side_relay.allocate(offer))
                if not 0 < port < 65536:
                    raise ValueError(f"relay port {port}")
                relay_ip = ipaddress.IPv4Address(self.side_relay.host)
            except Exception as e:      # the allocator is the carrier's; an IPv6 relay does not fit: fail closed
                out.add(self._anomaly("oft_relay_failed", f"no relay port for the SendFile proposal: {e}",
                                      from_client=from_client, cookie=cookie))
                self._inject_notice(out, f"imguard: the file {offer.name!r} could not be relayed through the "
                                         "gateway; the offer was not passed on")
                self._drop(from_client)
                return
            relayed = replace(offer, addresses=(real,), relay_host=str(relay_ip), relay_port=port)
            if self.transfers is not None:
                self.transfers.expect(cookie, offer, kind=OFT_KIND, ttl=self.limits.oscar_transfer_ttl)
                self.transfers.expect((relayed.relay_host, port), relayed, kind=OFT_KIND,
                                      ttl=self.limits.oscar_transfer_ttl)
            out.add(self._event("oft_offer", category="file", ctx=offer.context, request=rv.request_number,
                                **relayed.to_dict()))
            data = self._rebuild(snac, icbm, 0x0005, relay_rendezvous(value, rv, relay_ip.packed, port))
        else:
            remember_offer(self.transfers, offer, self.limits.oscar_transfer_ttl)
            out.add(self._event("oft_offer", category="file", ctx=offer.context, request=rv.request_number,
                                **offer.to_dict()))
        self._forward(out, from_client, flap, data)

    def _relayed_already(self, rv) -> bool:
        """The proposal names an address of our side relay that an offer already waits on."""
        if self.side_relay is None or self.transfers is None or rv.use_proxy or not rv.port:
            return False
        # The client IP is the one the other session wrote (the server may add its own verified IP).
        return rv.client_ip == self.side_relay.host and self.transfers.get((self.side_relay.host, rv.port),
                                                                           kind=OFT_KIND) is not None


def relay_rendezvous(value: bytes, rv, ip: bytes, port: int) -> bytes:
    """The rendezvous block `value` with its direct address replaced by ip:port: client IP 0x0003 (added when
    absent), verified IP 0x0004 when present, port 0x0005 and the checks 0x0016 (IP xor) and 0x0017 (port xor)."""
    ip_check = bytes(b ^ 0xFF for b in ip)
    port_bytes = struct.pack(">H", port)
    new = {0x0003: ip, 0x0004: ip, 0x0005: port_bytes, 0x0016: ip_check,
           0x0017: struct.pack(">H", port ^ 0xFFFF)}
    tlvs = [(t, new.get(t, v)) for t, v in rv.tlvs]
    if not any(t == 0x0003 for t, _ in tlvs):
        tlvs.append((0x0003, ip))
    return value[:26] + build_tlvs(tlvs)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
