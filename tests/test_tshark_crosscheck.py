"""The constructed legacy transcripts (tests/data/legacy/: OSCAR, YMSG, MSNFTP, MSNSLP, built by the tests because
no public capture exists) and the SIP and MSRP messages written after the RFC examples (tests/data/sip/) checked by
someone else's decoder: each is written into a capture with scapy and decoded by tshark's dissectors (aim, ymsg,
msnms, sip with sdp, msrp); imguard's decoders must read the same fields from the same bytes (screen names, cookies,
message texts and charsets, file names and sizes, YMSG keys and values, MSN command lines and SLP headers, SIP
headers and the MSRP file offer, MSRP chunk headers and body). The OFT checksum is checked against RFC 1071's
published example and scapy's RFC 1071 implementation (the AIM checksum is the Internet checksum of the file, kept
in the upper 16 bits). Where tshark and the bytes disagree, tests/data/legacy/README.md says which side is wrong and
why; the tests compare what tshark gets right and pin what it gets wrong, so that a fixed dissector shows up here.

Needs tshark (tools/setup.sh test installs it): without it the tests skip, and fail when CI is set.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from imguard.protocols.msnp.decoder import CommandDecoder, parse_file_context, parse_mime, parse_p2p, parse_slp
from imguard.protocols.oscar.decoder import (FlapDecoder, message_texts, oft_checksum, parse_fragments, parse_icbm,
                                             parse_oft, parse_rendezvous, parse_snac, parse_tlvs, tlv)
from imguard.protocols.ymsg.decoder import PacketDecoder

LEGACY = Path(__file__).parent / "data" / "legacy"
CLIENT, SERVER = ("10.0.0.1", 40000), "10.0.0.2"


@pytest.fixture(autouse=True)
def _tshark():
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed (tools/setup.sh test)")


def transcript(name: str) -> list[tuple[bool, bytes]]:
    """[(from_client, bytes)], one per write, from tests/data/legacy/<name>.json."""
    doc = json.loads((LEGACY / f"{name}.json").read_text())
    return [(side == "c", text.encode("latin-1")) for side, text in doc["segments"]]


def write_capture(path: Path, writes: list[tuple[bool, bytes]], port: int, mss: int = 1400) -> Path:
    """The writes as one TCP connection (handshake, then each write in segments of at most `mss` bytes, in order)
    from CLIENT to SERVER:port, written with scapy's pcap writer."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.utils import PcapWriter

    seq = {True: 1000, False: 500000}
    ends = {True: (CLIENT[0], CLIENT[1]), False: (SERVER, port)}
    packets = []

    def segment(from_client: bool, flags: str, payload: bytes = b"") -> None:
        (src, sport), (dst, dport) = ends[from_client], ends[not from_client]
        p = Ether() / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq[from_client],
                                                 ack=seq[not from_client])
        packets.append(p / payload if payload else p)
        seq[from_client] += len(payload) or (1 if "S" in flags else 0)

    segment(True, "S")
    segment(False, "SA")
    segment(True, "A")
    for from_client, data in writes:
        for i in range(0, len(data), mss):
            segment(from_client, "PA", data[i:i + mss])
    with PcapWriter(str(path), linktype=1) as writer:
        for i, p in enumerate(packets):
            p.time = 1_000_000_000 + i / 1000
            writer.write(p)
    return path


class Frame:
    """One frame as tshark decoded it: its bytes and every field (name -> [(shown value, raw bytes, offset)],
    in order) and every text-only tree item (`labels`, e.g. msnms's lines)."""

    def __init__(self, raw: bytes, fields: dict[str, list[tuple[str, bytes, int]]], labels: list[str]):
        self.raw, self.fields, self.labels = raw, fields, labels

    def values(self, name: str) -> list[str]:
        return [v for v, _, _ in self.fields.get(name, [])]

    def raws(self, name: str) -> list[bytes]:
        return [r for _, r, _ in self.fields.get(name, [])]


def tshark(path: Path, *decode_as: str, layer: str) -> list[Frame]:
    """tshark -T json -x on the capture (`-d` for each decode_as), the frames that carry `layer`."""
    cmd = ["tshark", "-r", str(path), "-T", "json", "-x"]
    for d in decode_as:
        cmd += ["-d", d]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    frames = []
    for packet in json.loads(out, object_pairs_hook=lambda pairs: pairs):     # keep duplicate keys, in order
        layers = dict(dict(packet)["_source"])["layers"]
        if not any(k == layer for k, _ in layers):
            continue
        raw = bytes.fromhex(dict(layers)["frame_raw"][0])
        fields: dict[str, list[tuple[str, bytes, int]]] = {}
        labels: list[str] = []
        _walk([(k, v) for k, v in layers if k not in ("frame", "eth", "ip", "tcp") and not k.endswith("_raw")],
              fields, labels)
        frames.append(Frame(raw, fields, labels))
    return frames


_FIELD_NAME = re.compile(r"[a-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def _walk(pairs, fields, labels) -> None:
    raws = {}
    for k, v in pairs:
        if k.endswith("_raw"):
            raws.setdefault(k[:-4], []).append(v)
    seen: dict[str, int] = {}
    for k, v in pairs:
        if k.endswith("_raw"):
            continue
        named = _FIELD_NAME.fullmatch(k) is not None         # a field ("aim.buddyname"), not a tree item's text
        if isinstance(v, list) and v and isinstance(v[0], tuple):     # a subtree
            if not named:
                labels.append(k)
            _walk(v, fields, labels)
            continue
        if not named or isinstance(v, list):                 # a text item (msnms's lines) or an empty subtree
            labels.append(k)
            continue
        n = seen.get(k, 0)
        seen[k] = n + 1
        raw = raws.get(k, [])
        if n < len(raw) and isinstance(raw[n], list) and len(raw[n][0]) % 2 == 0:     # (bit fields: one digit)
            fields.setdefault(k, []).append((v, bytes.fromhex(raw[n][0]), raw[n][1]))
        else:
            fields.setdefault(k, []).append((v, b"", -1))


def tlv_values(frame: Frame) -> list[tuple[int, bytes]]:
    """[(TLV type, value)] for the TLVs tshark found, in order (nested ones after their parent), each value read
    from the frame where tshark says it is."""
    out = []
    for (t, _, _), (_, length_raw, offset) in zip(frame.fields["aim.tlv.value_id"], frame.fields["aim.tlv.length"],
                                                  strict=True):
        n = int.from_bytes(length_raw, "big")
        out.append((int(t), frame.raw[offset + 2:offset + 2 + n]))
    return out


# --- OSCAR ----------------------------------------------------------------------------------------------------

def imguard_flaps(writes):
    """[(from_client, Flap)] in the order they were written, one FlapDecoder per direction."""
    decoders = {True: FlapDecoder(), False: FlapDecoder()}
    return [(fc, f) for fc, data in writes for f in decoders[fc].feed(data)]


@pytest.mark.parametrize("name", ["oscar_login", "oscar_bos"])
def test_oscar_flaps_and_snacs_are_tsharks(tmp_path, name):
    """Every FLAP (channel, sequence, length) and every SNAC (family, subtype, request id), in order."""
    writes = transcript(name)
    frames = tshark(write_capture(tmp_path / "x.pcap", writes, 5190), "tcp.port==5190,aim", layer="aim")
    flaps = imguard_flaps(writes)
    theirs = [(int(c, 16), int(s), int(n)) for f in frames
              for c, s, n in zip(f.values("aim.channel"), f.values("aim.seqno"), f.values("aim.datalen"), strict=True)]
    assert [(f.channel, f.seq, len(f.data)) for _, f in flaps] == theirs
    snacs = [parse_snac(f.data) for _, f in flaps if f.channel == 2]
    assert [(s.family, s.subtype, s.request_id) for s in snacs] == [
        (int(a, 16), int(b, 16), int(c, 16)) for f in frames
        for a, b, c in zip(f.values("aim.fnac.family"), f.values("aim.fnac.subtype"), f.values("aim.fnac.id"),
                           strict=True)]


def test_oscar_login_screen_names_bos_address_and_cookie_are_tsharks(tmp_path):
    """The login: the screen name of the key request (17,06) and of the login (17,02), and every TLV of the
    authorizer's reply (17,03): screen name, BOS address, the 256-byte cookie, e-mail."""
    writes = transcript("oscar_login")
    frames = tshark(write_capture(tmp_path / "x.pcap", writes, 5190), "tcp.port==5190,aim", layer="aim")
    by_subtype = {int(f.values("aim.fnac.subtype")[0], 16): f for f in frames if f.values("aim.fnac.family")}
    ours = {s.subtype: parse_tlvs(s.data)[0] for s in
            (parse_snac(f.data) for _, f in imguard_flaps(writes) if f.channel == 2)
            if s.family == 0x17 and s.subtype in (0x02, 0x03, 0x06)}      # (17,07) is a length and a key
    assert by_subtype[0x06].values("aim.buddyname") == [tlv(ours[0x06], 1).decode()] == ["alice1970"]
    assert dict(tlv_values(by_subtype[0x02]))[1] == tlv(ours[0x02], 1) == b"alice1970"
    assert tlv_values(by_subtype[0x03]) == ours[0x03]
    reply = dict(ours[0x03])
    assert (reply[1], reply[5], len(reply[6])) == (b"Alice1970", b"64.12.24.50:5190", 256)


def test_oscar_messages_are_tsharks(tmp_path):
    """Every ICBM: cookie, channel, the other party's screen name, and the text of each message block with its
    charset. tshark 4.0 shows a UCS-2BE text (charset 2) as if it were ASCII (NULs and stray bytes): its raw bytes,
    decoded by the charset tshark itself reports, are the text imguard reads (tests/data/legacy/README.md)."""
    writes = transcript("oscar_bos")
    frames = tshark(write_capture(tmp_path / "x.pcap", writes, 5190), "tcp.port==5190,aim", layer="aim_messaging")
    theirs = []
    for f in frames:
        if not f.values("aim_messaging.icbmcookie"):
            continue                                        # the typing notification: not an ICBM
        [cookie], [channel], [who] = (f.raws("aim_messaging.icbmcookie"), f.values("aim_messaging.channelid"),
                                      f.values("aim.buddyname"))
        texts = [(int(c, 16), raw.decode({0: "ascii", 2: "utf-16-be", 3: "latin-1"}[int(c, 16)]))
                 for c, raw in zip(f.values("aim.messageblock.charset"), f.raws("aim.messageblock.message"),
                                   strict=True)]
        theirs.append((cookie, int(channel, 16), who, texts))
        for (charset, text), shown in zip(texts, f.values("aim.messageblock.message"), strict=True):
            if charset == 0:
                assert shown == text                        # an ASCII text tshark shows as it is
    ours = []
    for _, flap in imguard_flaps(writes):
        snac = parse_snac(flap.data) if flap.channel == 2 else None
        if snac and snac.family == 4 and snac.subtype in (6, 7):
            icbm = parse_icbm(snac.data, incoming=snac.subtype == 7)
            texts = [(m.charset, m.text) for m in message_texts(parse_fragments(tlv(icbm.tlvs, 2)))]
            ours.append((icbm.cookie, icbm.channel, icbm.screen_name, texts))
    assert ours == theirs
    assert [t for *_, texts in ours for _, t in texts] == [
        '<HTML><BODY BGCOLOR="#ffffff"><FONT LANG="0">hi bob &amp; co</FONT></BODY></HTML>', "h\u00e9llo \u263a"]


def test_oscar_sendfile_rendezvous_is_tsharks(tmp_path):
    """A SendFile proposal (ICBM channel 2), packed here field by field from the published layout (not with
    imguard's builders): cookie, capability, client IP and port as tshark decodes them; the file name, count and
    size from TLV 0x2711, which tshark locates but does not decode, so they are read from where tshark puts it."""
    cookie, cap = bytes.fromhex("1122334455667788"), bytes.fromhex("094613434C7F11D18222444553540000")

    def t(kind: int, value: bytes) -> bytes:
        return struct.pack(">HH", kind, len(value)) + value

    rv = (struct.pack(">H", 0) + cookie + cap + t(0x000A, b"\x00\x01") + t(0x000F, b"") + t(0x0003, bytes([192, 168,
          1, 20])) + t(0x0005, struct.pack(">H", 5190)) + t(0x2711, struct.pack(">HHI", 1, 1, 10244) + b"setup.exe\x00")
          + t(0x2712, b"us-ascii"))
    icbm = cookie + struct.pack(">H", 2) + bytes([8]) + b"bobsmith" + t(0x0005, rv) + t(0x0003, b"")
    snac = struct.pack(">HHHI", 4, 6, 0, 9) + icbm
    flap = struct.pack(">BBHH", 0x2A, 2, 0x2001, len(snac)) + snac
    [f] = tshark(write_capture(tmp_path / "x.pcap", [(True, flap)], 5190), "tcp.port==5190,aim",
                 layer="aim_messaging")

    [(_, data)] = imguard_flaps([(True, flap)])
    ours_icbm = parse_icbm(parse_snac(data.data).data, incoming=False)
    ours = parse_rendezvous(tlv(ours_icbm.tlvs, 5))
    assert f.raws("aim_messaging.icbmcookie") == [ours_icbm.cookie, ours.cookie] == [cookie, cookie]
    assert (f.values("aim_messaging.channelid"), f.values("aim.buddyname")) == (["0x0002"], [ours_icbm.screen_name])
    assert int(f.values("aim_messaging.rendezvous.msg_type")[0], 16) == ours.type == 0
    assert f.raws("aim.nickinfo.caps") == [ours.capability] == [cap]           # SendFile's capability UUID
    outer, *inner, ack = tlv_values(f)                     # the ICBM's TLVs 5 and 3, the rendezvous TLVs between
    assert (outer, ack) == ((5, tlv(ours_icbm.tlvs, 5)), (3, b"")) and inner == ours.tlvs
    tlvs = dict(inner)
    assert ".".join(str(b) for b in tlvs[3]) == ours.client_ip == "192.168.1.20"
    assert struct.unpack(">H", tlvs[5])[0] == ours.port == 5190
    multiple, count, size = struct.unpack_from(">HHI", tlvs[0x2711])
    assert (tlvs[0x2711][8:].split(b"\x00")[0].decode(), size, count) == ours.file_info() == ("setup.exe", 10244, 1)


# --- the OFT checksum ------------------------------------------------------------------------------------------

def internet_checksum(data: bytes) -> int:
    from scapy.utils import checksum
    return checksum(data)


def test_oft_checksum_is_the_internet_checksum_rfc1071_example():
    """AIM's OFT checksum subtracts each big-endian 16-bit word from 0xFFFF with an end-around borrow, which is the
    ones'-complement of the ones'-complement sum: RFC 1071's Internet checksum, kept in the upper 16 bits. RFC 1071
    section 3 works the example 00 01 f2 03 f4 f5 f6 f7: sum 0xddf2, checksum 0x220d. The empty file's checksum is
    the seed 0xFFFF0000 (libpurple's oft.c, joscar's FileTransferChecksum)."""
    example = bytes.fromhex("0001f203f4f5f6f7")
    assert internet_checksum(example) == 0x220D
    assert oft_checksum(example) == 0x220D0000
    assert oft_checksum(b"") == 0xFFFF0000


@pytest.mark.parametrize("seed", range(5))
def test_oft_checksum_equals_scapys_internet_checksum(seed):
    """Random files of every length parity, with an odd byte at the end (padded with zero, as RFC 1071 does). The
    two are the same ones'-complement number; they may write zero differently (AIM keeps 0xFFFF, -0, where RFC 1071
    gives 0x0000 for some inputs), so zero is compared as zero."""
    rng = random.Random(seed)
    for n in [*range(0, 64), 1000, 1001, 4097, 65535, 65536 + 7]:
        data = rng.randbytes(n)
        ours, theirs = oft_checksum(data), internet_checksum(data)
        assert ours & 0xFFFF == 0
        assert ours >> 16 == theirs or {ours >> 16, theirs} == {0, 0xFFFF}, (n, data[:16].hex())


def test_oft_transcript_checksum_size_and_name_are_the_files():
    """oscar_oft.json: the prompt's checksum is the Internet checksum of the file that follows it (RFC 1071 via
    scapy), its sizes are the file's length, its cookie is the rendezvous cookie; the receiver's ack echoes the
    prompt. tshark has no OFT dissector (the header is not decoded by it), so these are checked against the file."""
    writes = transcript("oscar_oft")
    prompt, ack = parse_oft(writes[0][1]), parse_oft(writes[1][1])
    data = b"".join(d for fc, d in writes[2:] if not fc)
    assert (prompt.type, ack.type) == (0x0101, 0x0202)
    assert prompt.cookie == ack.cookie == bytes.fromhex("1122334455667788")
    assert (prompt.name, prompt.size, prompt.total_size) == ("setup.exe", len(data), len(data)) == (
        "setup.exe", 10244, 10244)
    assert prompt.checksum >> 16 == internet_checksum(data) and prompt.checksum == oft_checksum(data)
    assert writes[0][1][:4] == b"OFT2" and struct.unpack_from(">H", writes[0][1], 4)[0] == len(writes[0][1]) == 256


# --- YMSG -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ymsg_session", "ymsg_filetransfer"])
def test_ymsg_packets_are_tsharks(tmp_path, name):
    """Every YMSG packet: version, service, status, length and every key and value, in order (tshark's heuristic
    YMSG dissector finds them by the magic). The session id: imguard reads it big-endian, as libpurple and
    libyahoo2 write it (yahoo_put32); tshark 4.0 reads it little-endian: the same 4 bytes, shown byte-swapped
    (tests/data/legacy/README.md)."""
    writes = transcript(name)
    frames = tshark(write_capture(tmp_path / "x.pcap", writes, 5050), layer="ymsg")
    decoders = {True: PacketDecoder(), False: PacketDecoder()}
    ours = [p for fc, data in writes for p in decoders[fc].feed(data)]
    assert len(ours) == len(frames) == len(writes)
    for p, f in zip(ours, frames, strict=True):
        assert (p.version, p.vendor, p.service, p.status, len(p.raw) - 20) == tuple(
            int(f.values(k)[0], 0) for k in ("ymsg.version", "ymsg.vendor", "ymsg.service", "ymsg.status", "ymsg.len"))
        assert [(k, v) for k, v in p.fields] == [
            (k.decode(), v) for k, v in zip(f.raws("ymsg.content-line.key"), f.raws("ymsg.content-line.value"),
                                            strict=True)]
        [session_raw] = f.raws("ymsg.session_id")
        assert p.session_id == int.from_bytes(session_raw, "big")
        assert int(f.values("ymsg.session_id")[0], 16) == int.from_bytes(session_raw, "little")
    if name == "ymsg_filetransfer":
        offer = ours[0]
        assert (offer.service, offer.text("27"), offer.text("28"), offer.text("265")) == (
            0xDC, "report.exe", "48213", "TR1234")


# --- MSN: MSNFTP and MSNSLP -----------------------------------------------------------------------------------

def msnms_lines(frames: list[Frame]) -> list[str]:
    """The text lines tshark's msnms dissector shows (it has no fields: one tree item per line)."""
    return [label for f in frames for label in f.labels]


def test_msnftp_command_lines_are_tsharks(tmp_path):
    """MSNFTP: tshark's msnms splits the text part into lines (it decodes no fields and not the binary blocks);
    the command lines imguard's MSNP decoder reads (VER, USR with the e-mail and the AuthCookie, FIL with the size,
    TFR, BYE) are those lines. The data blocks follow the published layout (0x00, length little-endian 16 bits):
    their lengths add up to the size FIL announced."""
    writes = transcript("msnftp_direct")
    frames = tshark(write_capture(tmp_path / "x.pcap", writes, 6891), "tcp.port==6891,msnms", layer="msnms")
    lines = msnms_lines(frames)
    text_writes = [(fc, d) for fc, d in writes if not d.startswith(b"\x00")]
    ours = [c for fc, d in text_writes for c in CommandDecoder().feed(d)]
    assert [c.line.decode().replace("\r\n", "\\r\\n") for c in ours] == [
        line for line in lines if line.split(" ")[0].removesuffix("\\r\\n") in ("VER", "USR", "FIL", "TFR", "BYE")]
    assert [(c.verb, c.args) for c in ours] == [
        ("VER", ("MSNFTP",)), ("VER", ("MSNFTP",)), ("USR", ("cecile260992@hotmail.com", "9911")), ("FIL", ("5125",)),
        ("TFR", ()), ("BYE", ("16777989",))]
    data = b"".join(d for fc, d in writes if d.startswith(b"\x00"))
    pos, total = 0, 0
    while pos < len(data):
        assert data[pos] == 0
        n = data[pos + 1] | data[pos + 2] << 8
        total += n
        pos += 3 + n
    assert pos == len(data) and total == 5125


def test_msnslp_invite_lines_are_tsharks(tmp_path):
    """MSNSLP inside MSG payloads: tshark's msnms shows the MSG line, the MIME headers and the SLP lines (not the
    48-byte binary P2P header before them, nor the Context inside). imguard's MIME and SLP decode gives the same
    command line, P2P-Dest, Content-Type and the SLP headers (EUF-GUID of a file transfer, SessionID, AppID,
    Call-ID); the Context, decoded here by the MsnFileContext layout (size at 8, UTF-16LE name at 20), is the
    file name and size imguard reads, and the size is what the data chunks carry."""
    writes = transcript("msnslp_inband")
    frames = tshark(write_capture(tmp_path / "x.pcap", writes, 1863), layer="msnms")
    lines = msnms_lines(frames)
    decoders = {True: CommandDecoder(), False: CommandDecoder()}
    commands = [(fc, c) for fc, d in writes for c in decoders[fc].feed(d)]
    assert [c.line.decode().replace("\r\n", "\\r\\n") for _, c in commands] == [
        line for line in lines if line.startswith("MSG ")]
    shown = {label.split(": ", 1)[0]: label.split(": ", 1)[1].removesuffix("\\r\\n")
             for label in lines if ": " in label and not label.startswith("[")}
    msgs = [(fc, c, parse_p2p(parse_mime(c.payload).body)) for fc, c in commands]
    first = msgs[0][2]
    mime = parse_mime(commands[0][1].payload)
    invite = sorted((m for _, _, m in msgs if m.header.identifier == first.header.identifier),
                    key=lambda m: m.header.offset)
    slp = parse_slp(b"".join(m.data for m in invite))
    assert (shown["P2P-Dest"], shown["Content-Type"]) == (mime.get("P2P-Dest"), mime.content_type) == (
        "cecile260992@hotmail.com", "application/x-msnmsgrp2p")
    for header in ("EUF-GUID", "SessionID", "AppID", "Call-ID", "Content-Type"):
        if header == "Content-Type":
            assert "application/x-msnmsgr-sessionreqbody" == slp.get(header)
            continue
        assert shown[header] == slp.get(header), header
    assert slp.get("EUF-GUID") == "{5D3E02AB-6190-11D3-BBBB-00C04F795683}"       # the file-transfer application
    context = base64.b64decode(slp.get("Context"))
    size = struct.unpack_from("<Q", context, 8)[0]
    name = context[20:20 + 520].decode("utf-16-le").split("\x00")[0]
    assert parse_file_context(slp.get("Context")) == (name, size) and name == "report.exe"
    data = [m for fc, _, m in msgs if fc and m.header.flags == 0x01000030]
    assert sum(len(m.data) for m in data) == size


# --- SIP and MSRP (tests/data/sip: written after the RFC examples) --------------------------------------------

def sip_writes() -> list[tuple[bool, bytes]]:
    from test_sip_support import load
    return [(True, load("rfc3428_message.sip")), (True, load("rfc5547_invite.sip")), (False, load("rfc5547_200ok.sip"))]


def test_sip_message_and_file_offer_are_tsharks(tmp_path):
    """RFC 3428's MESSAGE and RFC 5547's file offer and answer over TCP: the request or status line, From and To
    (address and tag), Call-ID, CSeq, Content-Type and Content-Length (the body's length), the MESSAGE's text, and
    the SDP's MSRP media (port, protocol, path, direction, file-selector, file-transfer-id) as tshark's sip and
    sdp dissectors read them."""
    from imguard.protocols.sip.message import SipStreamDecoder, tag_of, uri_of
    from imguard.protocols.sip.sdp import msrp_media

    writes = sip_writes()
    frames = tshark(write_capture(tmp_path / "x.pcap", writes, 5060), layer="sip")
    decoders = {True: SipStreamDecoder(), False: SipStreamDecoder()}
    ours = [m for fc, d in writes for m in decoders[fc].feed(d)]
    assert len(ours) == len(frames) == 3
    for m, f in zip(ours, frames, strict=True):
        if m.is_request:
            assert (f.values("sip.Method"), f.values("sip.r-uri")) == ([m.method], [m.request_uri])
        else:
            assert f.values("sip.Status-Code") == [str(m.status)]
        assert f.values("sip.from.addr") == [uri_of(m.get("from"))]
        assert f.values("sip.to.addr") == [uri_of(m.get("to"))]
        assert f.values("sip.from.tag") == [tag_of(m.get("from"))]
        assert f.values("sip.to.tag") == ([tag_of(m.get("to"))] if tag_of(m.get("to")) else [])
        assert f.values("sip.Call-ID") == [m.call_id]
        assert (int(f.values("sip.CSeq.seq")[0]), f.values("sip.CSeq.method")[0]) == m.cseq
        assert f.values("sip.Content-Type") == [m.get("content-type")]
        assert f.values("sip.Content-Length") == [str(len(m.body))]
    message, invite, answer = ours
    assert message.body.decode() in frames[0].labels and message.body == b"Watson, come here."
    for m, f in ((invite, frames[1]), (answer, frames[2])):
        [media] = msrp_media(m.body.decode())
        attrs = f.values("sdp.media_attr")
        assert (f.values("sdp.media.port"), f.values("sdp.media.proto")) == ([str(media.port)], ["TCP/MSRP"])
        assert [a.removeprefix("path:") for a in attrs if a.startswith("path:")] == [" ".join(media.path)]
        assert media.direction in attrs
        if m is invite:
            selector = media.file
            assert f'file-selector:name:"{selector.name}" type:{selector.type} size:{selector.size} ' \
                   f'hash:{selector.hash}' in attrs
            assert f"file-transfer-id:{media.file_transfer_id}" in attrs
            assert (selector.name, selector.size, media.direction) == ("My cool picture.jpg", 32349, "sendonly")


def test_msrp_send_is_tsharks(tmp_path):
    """RFC 4975's first SEND: transaction id, method, To-Path, From-Path, Message-ID, Byte-Range, Content-Type,
    the end line's flag, and the body. tshark's msrp.data runs to the end of the chunk, the end line included
    ("...there?\\r\\n-------a786hjs2$\\r\\n"); the body is what comes before the CRLF that precedes the end line
    (RFC 4975 section 7.1): imguard's 23 bytes. tshark's field is the body plus the end line, not a different
    body (tests/data/legacy/README.md)."""
    from test_sip_support import load

    from imguard.protocols.msrp.framing import MsrpDecoder

    data = load("rfc4975_send.msrp")
    [f] = tshark(write_capture(tmp_path / "x.pcap", [(True, data)], 2855), "tcp.port==2855,msrp", layer="msrp")
    [chunk] = MsrpDecoder().feed(data)
    assert f.values("msrp.transaction.id")[0] == chunk.tid and f.values("msrp.method") == [chunk.method]
    assert f.values("msrp.to.path") == [" ".join(chunk.to_path)]
    assert f.values("msrp.from.path") == [" ".join(chunk.from_path)]
    assert f.values("msrp.messageid") == [chunk.message_id]
    assert f.values("msrp.byte.range") == [chunk.get("byte-range")]
    assert f.values("msrp.content.type") == [chunk.content_type]
    assert f.values("msrp.cnt.flg") == [chunk.flag]
    [shown] = f.raws("msrp.data")
    assert shown == chunk.body + b"\r\n-------" + chunk.tid.encode() + chunk.flag.encode() + b"\r\n"
    assert chunk.body == b"Hey Bob, are you there?"
