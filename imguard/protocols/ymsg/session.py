"""The YMSG (Yahoo! Messenger) client-to-server session: identity, message policy, file-transfer
announcements. Sans-io.

    session = YmsgSession(checker, transfers, ChatContext(client_address=..., server_address=...))
    session.data_received(True, <YMSG service 0x06: 1=alice 5=bob 14="the password is hunter2" 97=1>)
        -> [Send(to_client=False, data=<the same packet>)]                                    (allow)
        -> [Send(to_client=False, data=<the packet with key 14 rewritten, length fixed>)]     (mask)
        -> [Send(to_client=True, data=<service 0x06 from "imguard" to alice with the notice>)] (block)

Identity (the Yahoo id): AUTH (0x57) key 1 and AUTHRESP (0x54) keys 0/1 name it tentatively; the
server's first LOGON (0x01) confirms it (key 1, else 0), once: a later LOGON naming another id in key 1 is an
`identity_change` anomaly (high) and changes nothing. Once confirmed, what our client sends is labelled with
that id whatever its key 1 says (a different key 1, e.g. a profile alias, is a low `sender_mismatch`).

Messages: service 0x06 MESSAGE in both directions (conference messages 0x1D CONFMSG, keys 53 members,
57 room, 14 text, in: 3 sender; chat-room messages 0xA8 COMMENT, keys 104 room, 117 text, in: 109
sender, are checked the same way, with the room as the conversation). Client -> server: sender key 1 (else 0, else the
identity), recipient key 5, text key 14; server -> client: sender key 4, text key 14 (an offline
batch repeats 4/14 per message). Key 97 "1" means UTF-8, else the text is read as UTF-8 when valid,
otherwise Windows-1252. Yahoo markup (ESC [ ... m escape codes, <font>, <fade>, <alt> tags) is
stripped for policy.
- allow/alert: the exact packet crosses;
- mask: key 14 is replaced by `decision.masked_text` in UTF-8, key 97 set to 1, the header length
  recomputed (all other keys and the header fields kept);
- block/quarantine: a client message is dropped and our client gets a MESSAGE from the id "imguard"
  (service 0x06, keys 4/5/14/97, the server's last session id). An inbound message blocked is dropped
  with a notice naming its sender, in our client's words (a rule's notice is for our own senders only);
  in an offline batch (several messages in one packet) a blocked
  message's text is replaced by the notice instead, so the allowed ones still arrive.

File transfers (the bytes never cross this connection; they go over HTTP, which the gateway's HTTP
side must scan, using what this session registers in the shared ExpectedTransfers table):
- YMSG 15+ (0xDC offer with 265 transfer id, 222 action, 27 name, 28 size; 0xDD info / 0xDE accept
  with 249 method, 250 host, 251 token): the offer gives name/size per transfer id. When a 0xDD/0xDE
  names the host and token, a `YmsgTransfer` is registered:
  * relay (249 = 3): kind "ymsg_relay", key (host, token); for a file our client sends, also kind
    "upload" under the relay URL `http://<host>/relay?token=<token>&sender=<id>&recver=<peer>` as an
    `ExpectedUpload` (imguard.files.expected), so the HTTP upload addon holds and scans the POST;
  * peer to peer (249 = 1: the receiver GETs the file from the sender's host; 249 = 2: the sender
    POSTs it to the receiver's host; port 4443): kind "ymsg_p2p", key (host, 4443), and kind
    "ymsg_relay", key (host, token).
- 0x4D P2PFILEXFER and 0x46 FILETRANSFER with an URL (key 20): kind "ymsg_p2p", key (host, port) of
  the URL, and kind "ymsg_url", key the normalised URL.
- The YMSG <= 11 upload (`POST /notifyft`, YMSG header + fields + `29 0xC0 0x80` + the file) is not
  announced on this connection: the HTTP side recognises it with `decoder.parse_notifyft`.
An offer announcing more than `ymsg_max_file_size` (or a size that is not a number) is dropped with a
notice. Events: "ymsg_login", "ymsg_file_offer", "ymsg_file_expected", "ymsg_file_refused".

Anomalies (at most `ymsg_max_anomalies_per_kind` per kind): framing (bad magic, absurd length: the
connection closes), truncated packets at close, payloads that are not key/value pairs (forwarded;
a client MESSAGE with such a payload is dropped: the server might read text we did not).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from imguard.files.expected import ExpectedUpload, normalize_url
from imguard.model import FROM_CLIENT, FROM_SERVER, MASK, ChatContext, Decision, FileReport
from imguard.protocols.base import Anomaly, Close, Command, ProtocolEvent, Send, StreamSession, limited_anomaly
from imguard.protocols.framing import is_number
from imguard.protocols.ymsg.decoder import (AUTH, AUTHRESP, COMMENT, CONFMSG, FILETRANS_15, FILETRANS_ACC_15,
                                            FILETRANS_INFO_15, FILETRANSFER, LOGON, MESSAGE, P2PFILEXFER,
                                            FramingError, Packet, PacketDecoder, YmsgLimits, build_packet,
                                            decode_text, rebuild, strip_markup)

GATEWAY_NAME = "imguard"
RELAY_KIND = "ymsg_relay"       # key (host, token)
P2P_KIND = "ymsg_p2p"           # key (host, port)
URL_KIND = "ymsg_url"           # key the normalised URL
UPLOAD_KIND = "upload"          # imguard.files.expected.UPLOAD: key the normalised upload URL
P2P_PORT = 4443
# service -> (text key, recipients key (client side), room key, sender key (server side)); from libpurple's
# yahoo.c / yahoochat.c: MESSAGE 1/5/14 out, 4/14 in; CONFMSG 1/53/57/14 out, 3/57/14 in; COMMENT (chat
# rooms) 1/104/117 out, 109/104/117 in.
TEXT_SERVICES = {MESSAGE: ("14", "5", "", "4"), CONFMSG: ("14", "53", "57", "3"), COMMENT: ("117", "", "104", "109")}
_ids = itertools.count(1)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]+")



@dataclass(frozen=True)
class YmsgTransfer:
    """An announced Yahoo file transfer: what the HTTP connection that carries it is, and for whom."""
    transfer_id: str                # key 265 (or the URL for 0x46/0x4D)
    name: str
    size: int | None
    sender: str
    receiver: str
    method: str                     # "relay", "p2p", "url"
    url: str = ""
    host: str = ""
    port: int = 0
    token: str = ""
    outbound: bool = True           # sent by the gateway's own client
    context: ChatContext = field(default_factory=ChatContext)

    def to_dict(self) -> dict[str, Any]:
        return {"transfer_id": self.transfer_id, "name": self.name, "size": self.size, "sender": self.sender,
                "receiver": self.receiver, "method": self.method, "url": self.url, "host": self.host,
                "port": self.port, "outbound": self.outbound}


def find_ymsg_transfer(transfers, url: str = "", host: str = "", port: int = 0) -> YmsgTransfer | None:
    """For the HTTP carrier: the transfer behind a request to `url` (relay token in the query, or a
    peer-to-peer or 0x46 URL) or a connection to (host, port)."""
    if transfers is None:
        return None
    if url:
        found = transfers.get(normalize_url(url), kind=URL_KIND)
        if found is not None:
            return found
        parts = urlsplit(url)
        token = next((v for k, _, v in (p.partition("=") for p in parts.query.split("&")) if k == "token"), "")
        if token:
            for t in {token, unquote(token)}:
                found = transfers.get(((parts.hostname or "").lower(), t), kind=RELAY_KIND)
                if found is not None:
                    return found
        host = host or parts.hostname or ""
        port = port or parts.port or 80
    if host and port:
        return transfers.get((host.lower(), int(port)), kind=P2P_KIND)
    return None


class YmsgSession(StreamSession):
    """One YMSG client connection (StreamSession). See the module docstring."""

    def __init__(self, checker, transfers, context: ChatContext, limits: YmsgLimits = YmsgLimits()):
        self.checker = checker
        self.transfers = transfers
        self.context = context.with_(protocol="ymsg")
        self.limits = limits
        self._decoders = {True: PacketDecoder(limits), False: PacketDecoder(limits)}
        self.closed = False
        self.anomaly_counts: dict[str, int] = {}
        self.identity = ""
        self.confirmed = False
        self.session_id = 0             # the server's, for injected packets
        self.version = 0x0010
        self._offers: dict[str, dict[str, Any]] = {}

    def _ctx(self, **changes: Any) -> ChatContext:
        base = {"sender": self.identity}
        base.update(changes)
        return self.context.with_(**base)

    # --- StreamSession ------------------------------------------------------------------------------

    def data_received(self, from_client: bool, data: bytes) -> list[Command]:
        if self.closed:
            return []
        out: list[Command] = []
        forward = bytearray()

        def flush() -> None:
            if forward:
                out.append(Send(to_client=not from_client, data=bytes(forward)))
                forward.clear()

        for ev in self._decoders[from_client].feed(data):
            if isinstance(ev, FramingError):
                flush()
                self.closed = True
                out += [c for c in (self._anomaly(ev.kind, ev.detail, from_client=from_client, size=ev.size),
                                    Close(f"YMSG framing: {ev.kind}")) if c is not None]
                break
            replacement, extra = self._packet(from_client, ev)
            forward += replacement
            if extra:
                flush()
                out += extra
        flush()
        return self._merge(out)

    def tls_started(self) -> list[Command]:
        return []

    def file_verdict(self, transfer_id: str, report: FileReport, decision: Decision) -> list[Command]:
        return []           # files travel over HTTP: the HTTP side holds and decides

    def connection_closed(self, from_client: bool) -> list[Command]:
        pending = self._decoders[from_client].pending
        if pending and not self.closed:
            rec = self._anomaly("truncated_packet", "the connection closed in the middle of a YMSG packet (a length "
                                "larger than the data that came); not forwarded", from_client=from_client,
                                size=len(pending))
            return [rec] if rec else []
        return []

    # --- for the carrier ----------------------------------------------------------------------------

    def notice(self, text: str) -> list[Command]:
        """A notice from the gateway to this connection's user (e.g. an upload blocked by the HTTP side)."""
        if self.closed:
            return []
        return [Send(to_client=True, data=self._notice_packet(text))]

    # --- helpers ------------------------------------------------------------------------------------

    @staticmethod
    def _merge(cmds: list[Command]) -> list[Command]:
        out: list[Command] = []
        for c in cmds:
            if isinstance(c, Send) and out and isinstance(out[-1], Send) and out[-1].to_client == c.to_client:
                out[-1] = Send(to_client=c.to_client, data=out[-1].data + c.data)
            else:
                out.append(c)
        return out

    def _anomaly(self, kind: str, detail: str, **data: Any) -> Anomaly | None:
        return limited_anomaly(self.anomaly_counts, self.limits.ymsg_max_anomalies_per_kind, self._ctx(),
                               kind, detail, **data)

    def _event(self, action: str, category: str = "session", ctx: ChatContext | None = None,
               **data: Any) -> ProtocolEvent:
        return ProtocolEvent("ymsg", action, ctx or self._ctx(), category, data)

    def _notice_packet(self, text: str) -> bytes:
        text = (_CONTROL.sub(" ", text).strip() or GATEWAY_NAME)[:800]      # Yahoo clients cut longer messages
        return build_packet(MESSAGE, [("5", self.identity.encode()), ("4", GATEWAY_NAME.encode()),
                                      ("14", text.encode("utf-8")), ("97", b"1")],
                            status=1, session_id=self.session_id, version=self.version)

    # --- packets ------------------------------------------------------------------------------------

    def _packet(self, from_client: bool, p: Packet) -> tuple[bytes, list[Command]]:
        """(bytes to forward, other commands) for one packet."""
        extra: list[Command] = []
        if p.malformed:
            rec = self._anomaly("bad_pairs", p.malformed, from_client=from_client, service=p.service)
            if rec:
                extra.append(rec)
            if from_client and p.service == MESSAGE:
                return b"", extra           # fail closed: the server may read text we could not
        if from_client:
            self.version = p.version or self.version
            if p.service == AUTH and p.get("1") and not self.confirmed:
                self.identity = p.text("1")
            elif p.service == AUTHRESP and not self.confirmed:
                self.identity = p.text("0") or p.text("1") or self.identity
        else:
            if p.session_id:
                self.session_id = p.session_id
            if p.service == LOGON and not self.confirmed and (p.get("1") or p.get("0")):
                self.identity = p.text("1") or p.text("0")
                self.confirmed = True
                extra.append(self._event("ymsg_login", yahoo_id=self.identity))
            elif p.service == LOGON and p.get("1") and p.text("1").lower() != self.identity.lower():
                rec = self._anomaly("identity_change", "a later LOGON naming another Yahoo id: the identity stays",
                                    from_client=False, severity="high", yahoo_id=self.identity,
                                    claimed=p.text("1"))
                if rec:
                    extra.append(rec)
        if p.service in TEXT_SERVICES:
            return self._message(from_client, p, extra)
        if p.service in (FILETRANS_15, FILETRANS_INFO_15, FILETRANS_ACC_15):
            return self._filetrans15(from_client, p, extra)
        if p.service in (P2PFILEXFER, FILETRANSFER) and p.get("20"):
            self._file_url(from_client, p, extra)
        return p.raw, extra

    def _own_id(self, p: Packet, extra: list[Command]) -> str:
        """Who our client's packet is from: the confirmed id (its key 1 cannot change that), else key 1 / 0."""
        claimed = p.text("1") or p.text("0")
        if not self.confirmed:
            return claimed or self.identity
        if claimed and claimed.lower() != self.identity.lower():
            rec = self._anomaly("sender_mismatch", "our client's packet names another Yahoo id than the one it "
                                "logged in as; labelled with its login", from_client=True, yahoo_id=self.identity,
                                claimed=claimed)
            if rec:
                extra.append(rec)
        return self.identity

    # --- messages -----------------------------------------------------------------------------------

    def _message(self, from_client: bool, p: Packet, extra: list[Command]) -> tuple[bytes, list[Command]]:
        text_key, recipients_key, room_key, server_sender_key = TEXT_SERVICES[p.service]
        utf8 = p.text("97") == "1"
        room = p.text(room_key) if room_key else ""
        if from_client:
            sender = self._own_id(p, extra)
            recipients = tuple(v.decode("utf-8", "replace") for v in p.all(recipients_key)) if recipients_key else ()
            groups = [(sender, i) for i, (k, _) in enumerate(p.fields) if k == text_key]
        else:
            groups, sender = [], ""
            for i, (k, v) in enumerate(p.fields):
                if k == server_sender_key:
                    sender = v.decode("utf-8", "replace")
                elif k == text_key:
                    groups.append((sender, i))
            recipients = (self.identity,) if self.identity and not room else ()
        if not groups:
            return p.raw, extra
        fields = list(p.fields)
        changed = False
        for who, index in groups:
            text = strip_markup(decode_text(fields[index][1], utf8))
            if not text.strip():
                continue
            ctx = self._ctx(sender=who, recipients=recipients, conversation=room,
                            origin=FROM_CLIENT if from_client else FROM_SERVER)
            decision = self.checker.check_message(text, ctx)
            if decision.blocked:
                words = {"block": "blocked", "quarantine": "quarantined"}
                action = words.get(decision.action, "blocked")
                why = "; ".join(m.title or m.rule_id for m in decision.matches) or "policy"
                if from_client:
                    to = f" to {', '.join(recipients or (room,))}" if recipients or room else ""
                    extra.append(Send(True, self._notice_packet(decision.notice or
                                                                f"Your message{to} was {action} by imguard: {why}")))
                    return b"", extra
                # Our client is the receiver: told in its own words (a rule's notice is written for a sender).
                notice = f"A message from {who} was {action} by imguard: {why}"
                if len(groups) == 1:
                    extra.append(Send(True, self._notice_packet(notice)))
                    return b"", extra
                fields[index] = (text_key, f"[imguard] {notice}".encode("utf-8"))
                changed = True
            elif decision.action == MASK and decision.masked_text is not None:
                fields[index] = (text_key, decision.masked_text.encode("utf-8"))
                changed = True
                if decision.notice and from_client:     # a rule's notice is for the sender, ours only
                    extra.append(Send(True, self._notice_packet(decision.notice)))
        if not changed:
            return p.raw, extra
        if any(k == "97" for k, _ in fields):
            fields = [(k, b"1") if k == "97" else (k, v) for k, v in fields]
        else:
            fields.append(("97", b"1"))
        size = sum(len(k) + len(v) + 4 for k, v in fields)
        if size > min(self.limits.ymsg_max_packet, 0xFFFF):
            rec = self._anomaly("mask_too_large", f"the rewritten packet ({size} bytes) exceeds the "
                                "YMSG length; the message was dropped", from_client=from_client)
            if rec:
                extra.append(rec)
            extra.append(Send(True, self._notice_packet("imguard: a message was rewritten by policy and became "
                                                        "too long to send; it was dropped")))
            return b"", extra
        return rebuild(p, fields), extra

    # --- files --------------------------------------------------------------------------------------

    def _refuse(self, from_client: bool, name: str, size: str, sender: str, receiver: str,
                extra: list[Command]) -> tuple[bytes, list[Command]]:
        ctx = self._ctx(sender=sender, recipients=(receiver,), transfer_mechanism="upload")
        extra.append(self._event("ymsg_file_refused", category="file", ctx=ctx, reason="too_large", name=name,
                                 size=size))
        who = f"to {receiver}" if from_client else f"from {sender}"
        extra.append(Send(True, self._notice_packet(
            f"The file {name!r} ({size} bytes) {who} is larger than {self.limits.ymsg_max_file_size} bytes or has no "
            "valid size; it cannot be inspected and imguard did not pass the offer on")))
        return b"", extra

    def _filetrans15(self, from_client: bool, p: Packet, extra: list[Command]) -> tuple[bytes, list[Command]]:
        tid = p.text("265")
        if not tid:
            return p.raw, extra
        if p.service == FILETRANS_15 and p.text("222") == "1":      # the offer
            names = [v.decode("utf-8", "replace") for v in p.all("27")]
            sizes = [v.decode("latin-1") for v in p.all("28")]
            if from_client:
                sender, receiver = self._own_id(p, extra), p.text("5")
            else:
                sender, receiver = (p.text("4") or p.text("1")), (self.identity or p.text("5"))
            total = 0
            for name, size in zip(names, sizes, strict=False):
                if not is_number(size) or int(size) > self.limits.ymsg_max_file_size:
                    return self._refuse(from_client, name, size, sender, receiver, extra)
                total += int(size)
            self._offers[tid] = {"names": names, "size": total if sizes else None, "sender": sender,
                                 "receiver": receiver, "outbound": from_client}
            while len(self._offers) > 256:
                self._offers.pop(next(iter(self._offers)))
            extra.append(self._event("ymsg_file_offer", category="file",
                                     ctx=self._ctx(sender=sender, recipients=(receiver,), transfer_mechanism="upload"),
                                     transfer_id=tid, names=names, size=total if sizes else None,
                                     outbound=from_client))
            return p.raw, extra
        host, token = p.text("250"), p.text("251")
        offer = self._offers.get(tid)
        if host and token:
            if offer is None:
                rec = self._anomaly("ymsg_unknown_transfer", "relay host and token for a transfer id not offered on "
                                    "this connection; its HTTP transfer cannot be attributed",
                                    from_client=from_client, transfer_id=tid)
                if rec:
                    extra.append(rec)
            else:
                self._register(p, tid, offer, host, token, extra)
        return p.raw, extra

    def _register(self, p: Packet, tid: str, offer: dict[str, Any], host: str, token: str,
                  extra: list[Command]) -> None:
        method = "relay" if p.text("249") in ("3", "") else "p2p"
        name = ", ".join(offer["names"])
        sender, receiver = offer["sender"], offer["receiver"]
        url = (f"http://{host}/relay?token={quote(token, safe='')}&sender={quote(sender, safe='')}"
               f"&recver={quote(receiver, safe='')}")
        mechanism = "upload" if method == "relay" else "ymsg_p2p"
        ctx = self._ctx(sender=sender, recipients=(receiver,), transfer_mechanism=mechanism)
        t = YmsgTransfer(transfer_id=tid, name=name, size=offer["size"], sender=sender, receiver=receiver,
                         method=method, url=url, host=host.lower(), port=P2P_PORT if method == "p2p" else 80,
                         token=token, outbound=offer["outbound"], context=ctx)
        ttl = self.limits.ymsg_transfer_ttl
        if self.transfers is not None:
            self.transfers.expect((t.host, token), t, kind=RELAY_KIND, ttl=ttl)
            if method == "p2p":
                self.transfers.expect((t.host, P2P_PORT), t, kind=P2P_KIND, ttl=ttl)
            elif offer["outbound"]:
                self.transfers.expect(normalize_url(url), ExpectedUpload(
                    put_url=url, get_url=url, name=name, size=offer["size"], content_type="", context=ctx),
                    kind=UPLOAD_KIND, ttl=ttl)
        extra.append(self._event("ymsg_file_expected", category="file", ctx=ctx, **t.to_dict()))

    def _file_url(self, from_client: bool, p: Packet, extra: list[Command]) -> None:
        url = p.text("20")
        parts = urlsplit(url)
        if not parts.hostname:
            rec = self._anomaly("ymsg_bad_url", f"a file-transfer URL {url[:100]!r}", from_client=from_client)
            if rec:
                extra.append(rec)
            return
        if from_client:
            sender, receiver = self._own_id(p, extra), p.text("5")
        else:
            sender, receiver = p.text("4") or p.text("1"), self.identity or p.text("5")
        size = p.text("28")
        ctx = self._ctx(sender=sender, recipients=(receiver,), transfer_mechanism="ymsg_p2p")
        t = YmsgTransfer(transfer_id=url, name=p.text("27"), size=int(size) if is_number(size) else None,
                         sender=sender, receiver=receiver, method="url", url=url, host=parts.hostname.lower(),
                         port=parts.port or 80, outbound=from_client, context=ctx)
        if self.transfers is not None:
            self.transfers.expect(normalize_url(url), t, kind=URL_KIND, ttl=self.limits.ymsg_transfer_ttl)
            self.transfers.expect((t.host, t.port), t, kind=P2P_KIND, ttl=self.limits.ymsg_transfer_ttl)
        extra.append(self._event("ymsg_file_expected", category="file", ctx=ctx, **t.to_dict()))
