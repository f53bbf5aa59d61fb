"""YmsgSession: byte-exact sessions built from the wire layout (no YMSG capture exists; see
tests/data/legacy/README.md): login, messages each way, block, mask, file-transfer registration, bad input."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from imguard.files.expected import ExpectedTransfers
from imguard.model import ChatContext
from imguard.protocols.base import Close
from imguard.protocols.ymsg import (MESSAGE, PacketDecoder, YmsgLimits, YmsgSession, build_packet,
                                    find_ymsg_transfer, parse_notifyft, strip_markup)
from tests.test_irc_support import Checker, anomalies, records, sends

DATA = Path(__file__).parent / "data" / "legacy"
ME, PEER = "alice_1970", "bob.smith"
CTX = ChatContext(client_address="10.0.0.5:40002", server_address="98.136.48.120:5050", connection_id="y1")
SID = 0x5A1E2B3C


def pkt(service, fields, status=0, session=0):
    return build_packet(service, [(k, v.encode("utf-8") if isinstance(v, str) else v) for k, v in fields],
                        status=status, session_id=session, version=0x0010)


def login_transcript():
    return [
        (True, pkt(0x4C, [])),                                                       # verify
        (False, pkt(0x4C, [], status=1)),
        (True, pkt(0x57, [("1", ME)])),                                              # AUTH
        (False, pkt(0x57, [("1", ME), ("94", "AbCdEfGhIjKlMnOp"), ("13", "2")], status=1, session=SID)),
        (True, pkt(0x54, [("277", "v=1&n=..."), ("278", "z=..."), ("307", "abc"), ("0", ME), ("2", ME),
                          ("2", "1"), ("1", ME), ("244", "4194239"), ("98", "us"), ("135", "9.0.0.2162")],
                   session=SID)),
        (False, pkt(0x55, [("89", ME), ("59", "Y\tv=1&n=..."), ("59", "T\tz=..."), ("3", ME), ("90", "1"),
                           ("100", "0"), ("101", ""), ("102", ""), ("93", "86400")], session=SID)),
        (False, pkt(0x01, [("0", ME), ("1", ME), ("8", "1"), ("7", PEER), ("10", "0"), ("11", "0"),
                           ("17", "0"), ("13", "1")], session=SID)),
    ]


def message_transcript():
    return [
        (True, pkt(MESSAGE, [("1", ME), ("5", PEER), ("14", "\x1b[1m<font face=\"Arial\" size=\"10\">hi bob"
                                                         "</font>\x1b[x1m"), ("97", "1"), ("63", ";0"),
                             ("64", "0"), ("206", "0")], status=0x5A55AA56, session=SID)),
        (False, pkt(MESSAGE, [("5", ME), ("4", PEER), ("14", "h\u00e9llo alice \u263a"), ("97", "1"),
                              ("63", ";0"), ("64", "0"), ("1002", "1"), ("206", "1")], status=1, session=SID)),
        (True, pkt(0x4B, [("4", ME), ("5", PEER), ("14", " "), ("13", "1"), ("49", "TYPING")], status=0x16,
                   session=SID)),
    ]


def save_transcript(name: str, items) -> None:
    """The constructed session must equal its stored transcript in tests/data/legacy (same format as the
    capture extracts), kept for replay tests; IMGUARD_REGEN_TRANSCRIPTS=1 rewrites it."""
    doc = {"source": "constructed in tests/test_ymsg.py from the wire layout (no capture)",
           "encoding": "each segment is one write; text is the bytes decoded as latin-1",
           "segments": [["c" if fc else "s", d.decode("latin-1")] for fc, d in items]}
    path = DATA / name
    text = json.dumps(doc, indent=0, ensure_ascii=True) + "\n"
    if os.environ.get("IMGUARD_REGEN_TRANSCRIPTS") == "1":
        path.write_text(text)
    assert path.read_text() == text, f"{path} differs from the constructed session"


def run(session, items):
    out = []
    for fc, data in items:
        out += session.data_received(fc, data)
    return out


def logged_in(checker=None, transfers=None, limits=YmsgLimits()):
    s = YmsgSession(checker or Checker(), transfers if transfers is not None else ExpectedTransfers(), CTX, limits)
    run(s, login_transcript())
    return s


def packets(data: bytes):
    return PacketDecoder().feed(data)


# --- login and messages -----------------------------------------------------------------------------

def test_login_and_messages_cross_byte_exact():
    """The whole constructed session crosses unchanged; the login names the Yahoo id."""
    items = login_transcript() + message_transcript()
    save_transcript("ymsg_session.json", items)
    checker = Checker()
    s = YmsgSession(checker, ExpectedTransfers(), CTX)
    out = run(s, items) + s.connection_closed(True) + s.connection_closed(False)
    assert sends(out, False) == b"".join(d for fc, d in items if fc)
    assert sends(out, True) == b"".join(d for fc, d in items if not fc)
    assert [e["imguard"]["ymsg"]["yahoo_id"] for e in records(out, "ymsg_login")] == [ME]
    assert [(t, c.sender, c.recipients, c.protocol) for t, c in checker.calls] == [
        ("hi bob", ME, (PEER,), "ymsg"), ("h\u00e9llo alice \u263a", PEER, (ME,), "ymsg")]
    assert anomalies(out) == []


def test_a_later_logon_or_a_forged_key_1_changes_no_identity():
    """Attack transcript: a later LOGON naming another id must NOT relabel our user (identity_change), and our
    client's own key 1 cannot either: its message is decided as the id it logged in as."""
    checker = Checker()
    s = logged_in(checker)
    out = run(s, [(False, pkt(0x01, [("0", "security-team"), ("1", "security-team"), ("7", PEER)], session=SID)),
                  (True, pkt(MESSAGE, [("1", "security-team"), ("5", PEER), ("14", "hello"), ("97", "1")],
                             session=SID))])
    assert anomalies(out) == ["identity_change", "sender_mismatch"] and s.identity == ME
    assert checker.calls[-1][1].sender == ME


def test_chunk_boundaries_same_result():
    """The client side split at every offset (the server's between the halves): same bytes, same texts."""
    items = login_transcript() + message_transcript()
    client = b"".join(d for fc, d in items if fc)
    server = b"".join(d for fc, d in items if not fc)
    for cut in range(1, len(client)):
        checker = Checker()
        s = YmsgSession(checker, None, CTX)
        out = run(s, [(True, client[:cut]), (False, server), (True, client[cut:])])
        assert sends(out, False) == client and sends(out, True) == server
        assert sorted(t for t, _ in checker.calls) == sorted(["h\u00e9llo alice \u263a", "hi bob"]), cut


def test_markup_stripped():
    assert strip_markup("\x1b[31m<fade #ff0000,#00ff00>red</fade> <alt #1,#2>x</alt>\x1b[#aabbccm a<b") == "red x a<b"


# --- block and mask -------------------------------------------------------------------------------

def test_blocked_message_dropped_with_notice_from_imguard():
    """A blocked message must NOT reach the server; the client gets service 0x06 from "imguard"."""
    s = logged_in(Checker(block=("secret",)))
    out = s.data_received(True, pkt(MESSAGE, [("1", ME), ("5", PEER), ("14", "the secret plan"), ("97", "1")],
                                    session=SID))
    assert sends(out, False) == b""
    (notice,) = packets(sends(out, True))
    assert notice.service == MESSAGE and notice.session_id == SID and notice.status == 1
    assert notice.text("4") == "imguard" and notice.text("5") == ME
    assert notice.text("14") == f"Your message to {PEER} was blocked by imguard: no secret"


def test_masked_message_length_fixed():
    """Mask: key 14 rewritten in UTF-8 (97=1 added), the header length matches the new payload."""
    s = logged_in(Checker(mask={"hunter2": "\u2022\u2022\u2022"}))
    original = pkt(MESSAGE, [("1", ME), ("5", PEER), ("14", "pw hunter2"), ("63", ";0")], status=0x5A55AA56,
                   session=SID)
    out = s.data_received(True, original)
    (p,) = packets(sends(out, False))
    assert struct.unpack(">H", p.raw[8:10])[0] == len(p.raw) - 20
    assert p.text("14") == "pw \u2022\u2022\u2022" and p.text("97") == "1" and p.text("63") == ";0"
    assert (p.status, p.session_id, p.version) == (0x5A55AA56, SID, 0x0010)


def test_inbound_blocked_message_dropped_with_notice():
    s = logged_in(Checker(block=("malware",)))
    out = s.data_received(False, pkt(MESSAGE, [("5", ME), ("4", PEER), ("14", "get malware"), ("97", "1")],
                                     status=1, session=SID))
    (notice,) = packets(sends(out, True))
    assert notice.text("4") == "imguard" and f"A message from {PEER} was blocked" in notice.text("14")


def test_offline_batch_blocked_message_replaced_others_kept():
    checker = Checker(block=("malware",))
    s = logged_in(checker)
    batch = pkt(MESSAGE, [("31", "6"), ("32", "6"), ("4", PEER), ("5", ME), ("14", "hello"), ("15", "1100000000"),
                          ("31", "6"), ("32", "6"), ("4", "carol"), ("5", ME), ("14", "get malware"),
                          ("15", "1100000001")], status=5, session=SID)
    (p,) = packets(sends(s.data_received(False, batch), True))
    assert p.all("14")[0] == b"hello" and p.all("14")[1].startswith(b"[imguard] A message from carol was blocked")
    assert [c.sender for _, c in checker.calls] == [PEER, "carol"]


# --- file transfers -------------------------------------------------------------------------------

def offer_packets(method="3", host="98.136.53.6", token="AbC/dEf=="):
    return [
        (True, pkt(0xDC, [("1", ME), ("5", PEER), ("265", "TR1234"), ("222", "1"), ("266", "1"), ("302", "268"),
                          ("300", "268"), ("27", "report.exe"), ("28", "48213"), ("301", "268"), ("303", "268")],
                   session=SID)),
        (False, pkt(0xDC, [("4", PEER), ("5", ME), ("265", "TR1234"), ("222", "3")], session=SID)),
        (True, pkt(0xDD, [("1", ME), ("5", PEER), ("265", "TR1234"), ("27", "report.exe"), ("249", method)],
                   session=SID)),
        (False, pkt(0xDD, [("1", ME), ("5", PEER), ("265", "TR1234"), ("27", "report.exe"), ("249", method),
                           ("250", host), ("251", token)], session=SID)),
    ]


def test_relay_upload_registered_for_the_http_side():
    """The offer gives name/size; the relay host/token register the POST URL (kind "upload") and (host, token)."""
    transfers = ExpectedTransfers()
    s = logged_in(Checker(), transfers)
    items = offer_packets()
    save_transcript("ymsg_filetransfer.json", items)
    out = run(s, items)
    assert sends(out, False) == b"".join(d for fc, d in items if fc)
    url = f"http://98.136.53.6/relay?token=AbC%2FdEf%3D%3D&sender={ME}&recver={PEER}"
    t = find_ymsg_transfer(transfers, url=url)
    assert t is not None and (t.name, t.size, t.sender, t.receiver, t.method) == ("report.exe", 48213, ME, PEER,
                                                                                 "relay")
    assert t.context.transfer_mechanism == "upload" and t.context.connection_id == "y1"
    upload = transfers.take_upload(url)
    assert upload is not None and upload.name == "report.exe" and upload.size == 48213
    assert len(records(out, "ymsg_file_offer")) == 1 and len(records(out, "ymsg_file_expected")) == 1


def test_p2p_transfer_registered_by_address():
    transfers = ExpectedTransfers()
    s = logged_in(Checker(), transfers)
    run(s, offer_packets(method="1", host="10.0.0.5", token="tok"))
    t = find_ymsg_transfer(transfers, host="10.0.0.5", port=4443)
    assert t is not None and t.method == "p2p" and t.name == "report.exe"
    assert find_ymsg_transfer(transfers, url="http://10.0.0.5:4443/relay?token=tok&sender=x&recver=y") is t


def test_p2pfilexfer_url_registered():
    transfers = ExpectedTransfers()
    s = logged_in(Checker(), transfers)
    url = "http://10.1.2.3:4443/Messenger.TR99?AppID=Messenger&UserID=bob"
    run(s, [(False, pkt(0x4D, [("4", PEER), ("5", ME), ("20", url), ("27", "pic.jpg"), ("28", "1000"),
                               ("14", "")], session=SID))])
    t = find_ymsg_transfer(transfers, url=url)
    assert t is not None and t.sender == PEER and t.receiver == ME and not t.outbound
    assert find_ymsg_transfer(transfers, host="10.1.2.3", port=4443) is t


def test_oversized_offer_refused():
    s = logged_in(Checker(), ExpectedTransfers(), YmsgLimits(ymsg_max_file_size=1000))
    out = s.data_received(True, offer_packets()[0][1])
    assert sends(out, False) == b"" and records(out, "ymsg_file_refused")
    assert b"cannot be inspected" in sends(out, True)


def test_notifyft_body_parsed():
    """The YMSG <= 11 upload body: YMSG header + fields + '29 0xC0 0x80' + the file."""
    head = pkt(0x46, [("0", ME), ("5", PEER), ("14", ""), ("27", "a.exe"), ("28", "5")])
    fields, offset = parse_notifyft(head + b"29\xc0\x80" + b"MZ\x90\x00\x03")
    assert fields["27"] == b"a.exe" and (head + b"29\xc0\x80" + b"MZ\x90\x00\x03")[offset:] == b"MZ\x90\x00\x03"
    assert parse_notifyft(b"GET / HTTP/1.1\r\n") == ({}, 0)


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [0x9000, 0xFFFF, 40000])
def test_absurd_length_closes(length):
    """A length above ymsg_max_packet (one with the top bit set reads as negative) is an anomaly and closes."""
    s = YmsgSession(Checker(), None, CTX)
    out = s.data_received(True, b"YMSG\x00\x10\x00\x00" + struct.pack(">H", length) + b"\x00\x06" + b"\x00" * 8)
    assert anomalies(out) == ["bad_length"] and isinstance(out[-1], Close) and sends(out, False) == b""
    if length & 0x8000:
        assert "read as signed" in records(out, "anomaly")[0]["imguard"]["anomaly"]["detail"]


def test_bad_magic_closes():
    out = YmsgSession(Checker(), None, CTX).data_received(True, b"HTTP/1.1 200 OK\r\n\r\n")
    assert anomalies(out) == ["bad_magic"]


def test_length_that_lies_truncated_at_close():
    s = YmsgSession(Checker(), None, CTX)
    full = pkt(MESSAGE, [("1", ME), ("5", PEER), ("14", "hello")])
    assert s.data_received(True, full[:-3]) == []
    assert anomalies(s.connection_closed(True)) == ["truncated_packet"]


def test_odd_pairs_message_dropped():
    """A client MESSAGE whose payload is not key/value pairs is an anomaly and does not reach the server."""
    payload = b"1\xc0\x80alice\xc0\x805\xc0\x80bob\xc0\x8014\xc0\x80"
    raw = b"YMSG\x00\x10\x00\x00" + struct.pack(">HHII", len(payload), MESSAGE, 0, 0) + payload
    out = YmsgSession(Checker(), None, CTX).data_received(True, raw)
    assert anomalies(out) == ["bad_pairs"] and sends(out, False) == b""


def test_conference_and_chat_room_messages_checked():
    """CONFMSG (0x1D) and chat-room COMMENT (0xA8) texts reach policy with the room as conversation."""
    checker = Checker(block=("secret",))
    s = logged_in(checker)
    conf = pkt(0x1D, [("1", ME), ("53", PEER), ("53", "carol"), ("57", "alice-1234"), ("14", "the secret"),
                      ("97", "1")], session=SID)
    out = s.data_received(True, conf)
    assert sends(out, False) == b"" and checker.calls[-1][1].recipients == (PEER, "carol")
    assert checker.calls[-1][1].conversation == "alice-1234"
    chat = pkt(0xA8, [("104", "Linux:1"), ("109", PEER), ("117", "hello room"), ("124", "1")], session=SID)
    assert sends(s.data_received(False, chat), True) == chat
    assert checker.calls[-1][0] == "hello room" and checker.calls[-1][1].sender == PEER
    assert checker.calls[-1][1].conversation == "Linux:1"


@pytest.mark.parametrize("extra,closes", [(0, False), (1, True)])
def test_packet_limit_edge(extra, closes):
    """ymsg_max_packet: a payload of exactly the limit is framed, one byte more closes."""
    s = YmsgSession(Checker(), None, CTX, YmsgLimits(ymsg_max_packet=100))
    out = s.data_received(False, b"YMSG\x00\x10\x00\x00" + struct.pack(">HHII", 100 + extra, 0x12, 0, 0) +
                          b"1\xc0\x80" + b"a" * (94 + extra) + b"\xc0\x80")
    assert any(isinstance(c, Close) for c in out) == closes


def test_second_text_key_checked_too():
    """A client MESSAGE with two key-14 texts: both are checked (the server might deliver either)."""
    checker = Checker(block=("secret",))
    s = logged_in(checker)
    out = s.data_received(True, pkt(MESSAGE, [("1", ME), ("5", PEER), ("14", "hello"), ("14", "secret")],
                                    session=SID))
    assert sends(out, False) == b""


def test_mask_that_grows_too_large_is_dropped():
    """A masked text that no longer fits a YMSG packet is dropped with a notice, never an exception."""
    s = logged_in(Checker(mask={"x": "y" * 40000}))
    out = s.data_received(True, pkt(MESSAGE, [("1", ME), ("5", PEER), ("14", "x")], session=SID))
    assert sends(out, False) == b"" and anomalies(out) == ["mask_too_large"]
