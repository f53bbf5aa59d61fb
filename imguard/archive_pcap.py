"""`imguard archive export --pcap`: archived conversations or a blocked transfer written as a capture (pcapng) that
Wireshark opens, for incident response.

The archive keeps records (who, when, over which connection, the text when kept, a file's name, size and SHA-256,
what policy did), not the bytes that crossed. So the capture is rebuilt from the records, in each protocol's own
framing, and every frame says so in its pcapng comment. What is synthetic:

  * one TCP connection per archived connection (`connection_id`, else the client's address): a handshake a
    millisecond before its first record, each record as data segments (at most 1400 bytes) acknowledged by the
    peer, a FIN handshake after its last; sequence numbers start at values derived from the connection's id;
  * addresses: the client's address and port are the archived `client_address`; the server's address is not
    archived, so 192.0.2.1 (2001:db8::1 for an IPv6 client; documentation addresses) on the protocol's usual port
    (XMPP 5222, IRC 6667) stands for it; a DCC listener, whose address is not archived either, is 198.51.100.1;
    a client whose address the record lacks is 203.0.113.n; Ethernet addresses are locally administered dummies;
  * timestamps: each record's archived time (one microsecond between the frames of a record);
  * the protocol bytes, rebuilt from the records:
    XMPP: a stream header each way, then a `<message>` per message (`type='groupchat'` in a room), and a file as
    an in-band bytestream (XEP-0047 open, data, close) carrying the quarantined bytes, whatever mechanism carried
    it (the archive keeps the mechanism's name, not its exchange); a file without bytes is a message with its
    name, size and hash in a `jabber:x:oob` description.
    IRC: `NICK`/`USER`, then a `PRIVMSG` per message (one per line of a multi-line text; from the server with the
    sender's prefix). The archive keeps a text, not its command: a text without a target (the reason of a QUIT or
    an AWAY) is written as a QUIT. A file is its `DCC SEND` offer, then the DCC data connection from the
    receiver (the archived address of the connection the file was recorded on) to the sender's listener, carrying
    the quarantined bytes and the receiver's 4-byte acknowledgement.
    A file goes on its sender's (or receiver's, inbound) chat connection when the export holds one, else on a
    connection of its own (XMPP: the one it was archived on; IRC: a chat connection from a 203.0.113.n address);
    a file whose bytes the quarantine does not hold (an allowed file, or one removed) is its offer alone; a
    message whose text was not kept (`archive_text`) is an empty stanza or PRIVMSG.

Protocols without a rebuild here (OSCAR, YMSG, MSNP, SIP, the HTTP chat APIs, ...) are counted as `skipped` and
left out. The capture is written with scapy's pcapng writer; its IP and TCP checksums are correct.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import ipaddress
import json
import re
from pathlib import Path
from typing import Any, Iterator
from xml.sax.saxutils import escape, quoteattr

from imguard import archive as archive_module
from imguard.archive_export import ExportResult, quarantined_file, records_after

SERVER_V4, SERVER_V6 = "192.0.2.1", "2001:db8::1"     # the server's address is not archived (RFC 5737, RFC 3849)
PEER_V4, PEER_V6 = "198.51.100.1", "2001:db8::2"      # a DCC peer outside
CLIENT_V4 = "203.0.113."                              # a client whose address the record lacks: .1, .2, ...
PORTS = {"xmpp": 5222, "irc": 6667}
PROTOCOLS = tuple(PORTS)
MSS = 1400
IBB_BLOCK = 4096
DCC_PORT = 5000                                       # + n: the DCC sender's listening ports
MAC_CLIENT, MAC_SERVER = "02:00:00:00:00:01", "02:00:00:00:00:02"
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclasses.dataclass
class PcapExportResult(ExportResult):
    sessions: int = 0           # TCP connections written (chat connections and DCC data connections)
    packets: int = 0
    skipped: int = 0            # records of a protocol without a rebuild (see PROTOCOLS)


@dataclasses.dataclass
class Segment:
    ts: float
    from_client: bool
    data: bytes
    comment: str


@dataclasses.dataclass
class Connection:
    """One synthetic TCP connection: the client (who connects) and the server, and what each sent, in order."""

    client: tuple[str, int]
    server: tuple[str, int]
    segments: list[Segment] = dataclasses.field(default_factory=list)
    ended: bool = False         # the protocol's own goodbye was among the records (an IRC QUIT)

    def add(self, ts: float, from_client: bool, data: bytes, comment: str) -> None:
        if data:
            self.segments.append(Segment(ts, from_client, data, comment))


def record_time(record: dict) -> float:
    try:
        moment = datetime.datetime.fromisoformat(record.get("time") or "")
    except ValueError:
        return 0.0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def _host_port(text: str) -> tuple[str, int] | None:
    """'ip:port' or '[v6]:port' -> (ip, port); None when it is not one."""
    host, sep, port = (text or "").rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        return str(ipaddress.ip_address(host.strip("[]"))), int(port) & 0xFFFF
    except ValueError:
        return None


def _nick(identity: str) -> str:
    return (identity or "").split("!", 1)[0] or "unknown"


def _comment(record: dict, what: str) -> str:
    return (f"imguard archive record {record['id']} ({record.get('kind')}, action {record.get('action')}"
            f"{', rules ' + record['rules'] if record.get('rules') else ''}): {what}; synthetic, rebuilt from the "
            "archived record")


def _inside_party(record: dict) -> str:
    """The identity on the client's side of the connection the record was archived on."""
    if record.get("direction") == "inbound":
        return (record.get("recipients") or "").split(" ")[0]
    return record.get("sender") or ""


def _from_client(record: dict) -> bool:
    return record.get("direction") != "inbound"


# --- XMPP --------------------------------------------------------------------------------------------------

def _xml_text(text: str) -> str:
    return escape(_XML_INVALID.sub("\ufffd", text))


def _xml_attr(text: str) -> str:
    return quoteattr(_XML_INVALID.sub("\ufffd", text))


class XmppRebuild:
    port = PORTS["xmpp"]
    file_connection_is_chat = True      # IBB goes on the chat connection; SOCKS5 and uploads come from its host

    def preamble(self, connection: Connection, record: dict, ts: float) -> None:
        domain = (_inside_party(record).split("@", 1)[1:] or ["localhost"])[0].split("/")[0] or "localhost"
        head = ("<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
                "xmlns:stream='http://etherx.jabber.org/streams' version='1.0' ")
        connection.add(ts, True, (head + f"to={_xml_attr(domain)}>").encode(), "synthetic XMPP stream header")
        connection.add(ts, False, (head + f"from={_xml_attr(domain)} id='imguard-archive'>").encode(),
                       "synthetic XMPP stream header")

    def epilogue(self, connection: Connection, ts: float) -> None:
        """Nothing: tshark's XMPP dissector reads each frame alone and flags a `</stream:stream>` as closing an
        unopened tag, so the synthetic stream ends with the TCP close."""

    def message(self, connection: Connection, record: dict, ts: float) -> None:
        sender, to, kind = self._addressing(record)
        text = record.get("text")
        body = f"<body>{_xml_text(text)}</body>" if text is not None else ""
        stanza = (f"<message from={_xml_attr(sender)} to={_xml_attr(to)} type='{kind}' "
                  f"id='imguard-{record['id']}'>{body}</message>")
        connection.add(ts, _from_client(record), stanza.encode(),
                       _comment(record, "the message" if text is not None else "the message (text not kept)"))

    def file(self, connection: Connection, record: dict, ts: float, data: bytes | None, extra: "Connections",
             own: tuple[str, int] | None) -> None:
        sender, to, _ = self._addressing(record)
        name = record.get("file_name") or ""
        from_client = _from_client(record)
        if data is None:
            desc = f"{name} ({record.get('file_size')} bytes, sha256 {record.get('sha256')})"
            stanza = (f"<message from={_xml_attr(sender)} to={_xml_attr(to)} id='imguard-{record['id']}'>"
                      f"<x xmlns='jabber:x:oob'><desc>{_xml_text(desc)}</desc></x></message>")
            connection.add(ts, from_client, stanza.encode(), _comment(record, "the file's offer (bytes not kept)"))
            return
        sid = f"imguard-{record['id']}"
        attrs = f"from={_xml_attr(sender)} to={_xml_attr(to)}"
        what = _comment(record, f"the file {name!r} ({len(data)} bytes, from the quarantine) as an in-band bytestream")
        connection.add(ts, from_client, (f"<iq type='set' {attrs} id='{sid}-open'><open "
                                         f"xmlns='http://jabber.org/protocol/ibb' sid='{sid}' "
                                         f"block-size='{IBB_BLOCK}' stanza='iq'/></iq>").encode(), what)
        for seq, start in enumerate(range(0, len(data), IBB_BLOCK)):
            chunk = base64.b64encode(data[start:start + IBB_BLOCK]).decode()
            connection.add(ts, from_client, (f"<iq type='set' {attrs} id='{sid}-{seq}'><data "
                                             f"xmlns='http://jabber.org/protocol/ibb' sid='{sid}' seq='{seq & 0xFFFF}'>"
                                             f"{chunk}</data></iq>").encode(), what)
        connection.add(ts, from_client, (f"<iq type='set' {attrs} id='{sid}-close'><close "
                                         f"xmlns='http://jabber.org/protocol/ibb' sid='{sid}'/></iq>").encode(), what)

    @staticmethod
    def _addressing(record: dict) -> tuple[str, str, str]:
        recipients = (record.get("recipients") or "").split()
        room = record.get("conversation") or ""
        to = room if room and (room in recipients or not recipients) else (recipients[0] if recipients else room)
        return record.get("sender") or "", to, "groupchat" if room and to == room else "chat"


# --- IRC ---------------------------------------------------------------------------------------------------

class IrcRebuild:
    port = PORTS["irc"]
    file_connection_is_chat = False     # a DCC file is archived on its data connection

    def preamble(self, connection: Connection, record: dict, ts: float) -> None:
        nick = _nick(_inside_party(record))
        connection.add(ts, True, f"NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\n".encode(),
                       "synthetic IRC registration of the client's nick")

    def epilogue(self, connection: Connection, ts: float) -> None:
        if not connection.ended:
            connection.add(ts, True, b"QUIT :imguard archive export\r\n", "synthetic end of the IRC session")

    def message(self, connection: Connection, record: dict, ts: float) -> None:
        """The archive keeps the text, not the command: a text with a target is a PRIVMSG, one without (the reason
        of a QUIT or an AWAY) a QUIT."""
        text = record.get("text")
        lines = (text or "").replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if not record.get("recipients") and not record.get("conversation"):
            connection.ended = _from_client(record)
            data = self._line(record, f"QUIT :{' '.join(lines)}")
        else:
            target = self._target(record)
            data = b"".join(self._line(record, f"PRIVMSG {target} :{line}") for line in lines)
        connection.add(ts, _from_client(record), data,
                       _comment(record, "the message" if text is not None else "the message (text not kept)"))

    def file(self, connection: Connection, record: dict, ts: float, data: bytes | None, extra: "Connections",
             own: tuple[str, int] | None) -> None:
        """The DCC SEND offer on the chat connection, then the DCC data connection with the bytes: the archive records
        the file on the data connection, whose client (`own`: its archived address) is the receiver that connected to
        the sender's listener (an active DCC; the listener's address is not archived)."""
        from_client = _from_client(record)
        listener_ip = PEER_V6 if own and ":" in own[0] else PEER_V4
        port = DCC_PORT + len(extra.by_key) % 60000
        name = record.get("file_name") or "file"
        if " " in name:
            name = '"' + name.replace('"', "") + '"'
        address = int(ipaddress.ip_address(listener_ip)) if ":" not in listener_ip else listener_ip
        size = len(data) if data is not None else (record.get("file_size") or 0)
        offer = self._line(record, f"PRIVMSG {self._target(record)} :\x01DCC SEND {name} {address} {port} {size}\x01")
        kept = "" if data is not None else " (bytes not kept)"
        connection.add(ts, from_client, offer, _comment(record, "the DCC SEND offer" + kept))
        if data is None:
            return
        receiver = own or (CLIENT_V4 + "254", 40000 + port % 20000)
        dcc = extra.get(("dcc", record["id"]), receiver, (listener_ip, port))
        what = _comment(record, f"the DCC data connection: the file ({len(data)} bytes, from the quarantine)")
        ts += 0.002                     # after the offer: the data connection's handshake a millisecond before
        dcc.add(ts, False, data, what)
        dcc.add(ts, True, (len(data) & 0xFFFFFFFF).to_bytes(4, "big"), what)     # the receiver's DCC ACK

    @staticmethod
    def _target(record: dict) -> str:
        room = record.get("conversation") or ""
        if room.startswith(("#", "&", "!", "+")):
            return room
        recipients = (record.get("recipients") or "").split()
        return _nick(recipients[0]) if recipients else (room or "*")

    @staticmethod
    def _line(record: dict, line: str) -> bytes:
        line = line.replace("\r", " ").replace("\n", " ").replace("\0", " ")
        if record.get("direction") == "inbound":
            line = f":{record.get('sender') or 'unknown'} {line}"
        return line.encode("utf-8", "replace") + b"\r\n"


REBUILDS = {"xmpp": XmppRebuild(), "irc": IrcRebuild()}


class Connections:
    """The synthetic connections, in the order they were opened."""

    def __init__(self) -> None:
        self.by_key: dict[Any, Connection] = {}

    def get(self, key: Any, client: tuple[str, int], server: tuple[str, int]) -> Connection:
        connection = self.by_key.get(key)
        if connection is None:
            connection = self.by_key[key] = Connection(client, server)
        return connection


def _party(record: dict) -> str:
    """The inside party of a record, as one key for its protocol: a nick, a bare JID."""
    return _nick(_inside_party(record)).split("/")[0].lower()


def build(records: list[dict], quarantine: Any = None) -> tuple[Connections, PcapExportResult]:
    """The records (in time order) as synthetic connections. A file goes on its party's chat connection when the
    export holds one (the archive records a DCC file, a SOCKS5 bytestream or an upload on the connection that carried
    the bytes, and the offer was on the chat connection); else on its own."""
    result = PcapExportResult()
    connections = Connections()
    rebuilds: dict[Any, Any] = {}
    last: dict[Any, float] = {}
    unknown_clients: dict[str, tuple[str, int]] = {}
    conversations = set()
    ordered = sorted(records, key=lambda r: (r.get("time") or "", r["id"]))
    chats: dict[tuple[str, str], Any] = {}       # (protocol, party) -> the key of the party's first chat connection

    def key_of(record: dict) -> Any:
        return (record.get("protocol"), record.get("connection_id") or record.get("client_address")
                or _inside_party(record))

    for record in ordered:
        if record.get("kind") != "file":
            chats.setdefault((record.get("protocol") or "", _party(record)), key_of(record))
    for record in ordered:
        protocol = record.get("protocol") or ""
        rebuild = REBUILDS.get(protocol)
        if rebuild is None:
            result.skipped += 1
            continue
        ts = record_time(record)
        own = _host_port(record.get("client_address") or "")
        key = key_of(record)
        if record.get("kind") == "file":
            alone = key if rebuild.file_connection_is_chat else (protocol, "offer", _party(record))
            key = chats.get((protocol, _party(record)), alone)
        if key in connections.by_key:
            connection = connections.by_key[key]
        else:
            client = own if key == key_of(record) else None
            if client is None:
                client = unknown_clients.setdefault(str(key), (CLIENT_V4 + str(len(unknown_clients) % 254 + 1),
                                                               40000 + len(unknown_clients)))
            connection = connections.get(key, client, (SERVER_V6 if ":" in client[0] else SERVER_V4, rebuild.port))
            rebuilds[key] = rebuild
            rebuild.preamble(connection, record, ts)
        last[key] = ts
        conversations.add((protocol, record.get("conversation") or ""))
        if record.get("kind") == "file":
            result.files += 1
            data = quarantined_file(record, quarantine)
            result.attached += data is not None
            rebuild.file(connection, record, ts, data, connections, own)
        else:
            result.messages += 1
            rebuild.message(connection, record, ts)
    for key, rebuild in rebuilds.items():
        rebuild.epilogue(connections.by_key[key], last[key])
    result.conversations = len(conversations)
    result.sessions = len(connections.by_key)
    return connections, result


def _packets(connection: Connection, seed: str) -> Iterator[tuple[float, Any]]:
    """The connection as Ethernet frames (scapy packets), each with its time and pcapng comment."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    digest = hashlib.sha256(seed.encode()).digest()
    seq = {True: int.from_bytes(digest[:4], "big"), False: int.from_bytes(digest[4:8], "big")}
    (cip, cport), (sip, sport) = connection.client, connection.server
    network = IPv6 if ":" in cip else IP

    def frame(from_client: bool, flags: str, ts: float, comment: str, payload: bytes = b"") -> tuple[float, Any]:
        src, dst = ((cip, cport), (sip, sport)) if from_client else ((sip, sport), (cip, cport))
        packet = (Ether(src=MAC_CLIENT if from_client else MAC_SERVER, dst=MAC_SERVER if from_client else MAC_CLIENT)
                  / network(src=src[0], dst=dst[0])
                  / TCP(sport=src[1], dport=dst[1], seq=seq[from_client] & 0xFFFFFFFF,
                        ack=seq[not from_client] & 0xFFFFFFFF if "A" in flags else 0, flags=flags, window=65535))
        if payload:
            packet = packet / Raw(payload)
        packet.time = ts
        packet.comments = [comment.encode()]
        return ts, packet

    if not connection.segments:
        return
    t = connection.segments[0].ts - 0.001
    step = 0.000001
    yield frame(True, "S", t, "synthetic TCP handshake")
    seq[True] += 1
    yield frame(False, "SA", t + step, "synthetic TCP handshake")
    seq[False] += 1
    yield frame(True, "A", t + 2 * step, "synthetic TCP handshake")
    t += 3 * step
    for segment in connection.segments:
        t = max(t, segment.ts)
        for start in range(0, len(segment.data), MSS):
            chunk = segment.data[start:start + MSS]
            yield frame(segment.from_client, "PA", t, segment.comment, chunk)
            seq[segment.from_client] += len(chunk)
            t += step
            yield frame(not segment.from_client, "A", t, "synthetic TCP acknowledgement")
            t += step
    yield frame(True, "FA", t, "synthetic TCP close")
    seq[True] += 1
    yield frame(False, "FA", t + step, "synthetic TCP close")
    seq[False] += 1
    yield frame(True, "A", t + 2 * step, "synthetic TCP close")


def write_capture(connections: Connections, path: Path) -> int:
    """Every connection's frames, in time order, into a pcapng file (scapy's writer); the number of frames."""
    from scapy.utils import PcapNgWriter

    frames = []
    for n, (key, connection) in enumerate(connections.by_key.items()):
        frames.extend((ts, n, i, packet) for i, (ts, packet) in enumerate(_packets(connection, repr(key))))
    frames.sort(key=lambda item: item[:3])
    writer = PcapNgWriter(str(path))
    try:
        for *_, packet in frames:
            writer.write(packet)
    finally:
        writer.close()
    return len(frames)


def export_pcap(store: archive_module.Archive, query: archive_module.Query, out_dir: Path, quarantine: Any = None,
                cursor_path: Path | None = None, record_id: str = "") -> PcapExportResult:
    """The records `query` selects (after the cursor's record; or the one record `record_id`, an archive id or uid)
    as one capture out_dir/imguard-archive-<first id>-<last id>.pcapng; then move the cursor."""
    cursor = 0
    if cursor_path is not None and cursor_path.exists():
        cursor = int(json.loads(cursor_path.read_text()).get("after_id", 0))
    if record_id:
        records = [r for r in _record(store, record_id) if r["id"] > cursor]
    else:
        records = list(records_after(store, query, cursor))
    connections, result = build(records, quarantine)
    result.cursor = max((r["id"] for r in records), default=cursor)
    out_dir.mkdir(parents=True, exist_ok=True)
    if connections.by_key:
        ids = [r["id"] for r in records]
        path = out_dir / f"imguard-archive-{min(ids)}-{max(ids)}.pcapng"
        result.packets = write_capture(connections, path)
        result.documents = 1
        result.paths.append(str(path))
    if cursor_path is not None:
        cursor_path.write_text(json.dumps({"after_id": result.cursor}) + "\n")
    return result


def _record(store: archive_module.Archive, record_id: str) -> list[dict]:
    """The record with this id (as `imguard archive search` prints it) or uid; [] when there is none."""
    if not record_id.isdigit():
        database = store.database()
        rows = database.fetch(f"SELECT id FROM records WHERE uid = {database.mark}", [record_id])
        if not rows:
            return []
        record_id = str(rows[0][0])
    wanted = int(record_id)
    page = store.search(archive_module.Query(after_id=wanted - 1, limit=1))
    return [r for r in page if r["id"] == wanted]
