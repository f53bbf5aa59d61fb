"""MsnpSession: the real MSN capture (ndpi/msnms.pcap), message policy, MSNFTP and MSNSLP transfers, bad input."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from imguard.files.expected import ExpectedTransfers
from imguard.model import ALLOW, BLOCK, ChatContext, Decision, FileReport, RuleMatch
from imguard.protocols.base import Anomaly, Close, InspectFile, Notify, ProtocolEvent, Record
from imguard.protocols.msnp import (FT_GUID, CommandDecoder, DirectMsnftpSession, MsnpLimits, MsnpSession, P2PHeader,
                                    build_file_context, build_p2p, find_msnftp_offer, format_command,
                                    parse_file_context)
from imguard.protocols.msnp.decoder import Command
from tests.test_irc_support import Checker, notifies, sends

DATA = Path(__file__).parent / "data" / "legacy"
ME, PEER = "jujurius@msn.com", "cecile260992@hotmail.com"
CTX = ChatContext(client_address="192.168.1.14:1208", server_address="207.46.108.83:1863", connection_id="sb1")
ALLOWED = Decision(action=ALLOW)
BLOCKED = Decision(action=BLOCK, matches=[RuleMatch("no-exe", BLOCK, "high", "enforce", title="no programs")])


def transcript(name: str) -> list[tuple[bool, bytes]]:
    doc = json.loads((DATA / name).read_text())
    return [(side == "c", text.encode("latin-1")) for side, text in doc["segments"]]


def save_transcript(name: str, items) -> None:
    """A constructed session must equal its stored transcript in tests/data/legacy (the capture-extract format),
    kept for replay tests; IMGUARD_REGEN_TRANSCRIPTS=1 rewrites it."""
    doc = {"source": "constructed in tests/test_msnp.py from the wire layouts (no capture)",
           "encoding": "each segment is one write; text is the bytes decoded as latin-1",
           "segments": [["c" if fc else "s", d.decode("latin-1")] for fc, d in items]}
    path = DATA / name
    text = json.dumps(doc, indent=0, ensure_ascii=True) + "\n"
    if os.environ.get("IMGUARD_REGEN_TRANSCRIPTS") == "1":
        path.write_text(text)
    assert path.read_text() == text, f"{path} differs from the constructed session"


def run(session, items) -> list:
    out = []
    for from_client, data in items:
        out += session.data_received(from_client, data)
    return out


def events(cmds) -> list[dict]:
    """The events the carrier would record for these commands (typed facts and whole events alike)."""
    return [c.event if isinstance(c, Record) else c.event() for c in cmds
            if isinstance(c, (Record, Anomaly, ProtocolEvent, Notify))]


def records(cmds, action: str | None = None) -> list[dict]:
    return [e for e in events(cmds) if action is None or e["event"].get("action") == action]


def anomalies(cmds) -> list[str]:
    return [e["imguard"]["anomaly"]["kind"] for e in records(cmds, "anomaly")]


def inspects(cmds) -> list[InspectFile]:
    return [c for c in cmds if isinstance(c, InspectFile)]


def text_msg(trid: int, body: str, flag: str = "N", charset: str = "UTF-8") -> bytes:
    payload = (f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset={charset}\r\n"
               f"X-MMS-IM-Format: FN=MS%20Shell%20Dlg; EF=; CO=0; CS=0; PF=0\r\n\r\n").encode() + body.encode(
        "utf-8" if charset.upper() == "UTF-8" else charset)
    return format_command("MSG", str(trid), flag, payload=payload)


def inbound_msg(body: str, sender: str = PEER) -> bytes:
    payload = (b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=UTF-8\r\nX-MMS-IM-Format: FN=Lucida%20Grande;"
               b" EF=; CO=C81ABB; CS=0; PF=2\r\n\r\n" + body.encode())
    return format_command("MSG", sender, "choupi", payload=payload)


def switchboard(checker=None, transfers=None, limits=MsnpLimits()) -> MsnpSession:
    """A session past ANS/IRO (the shape of msnms_sb2)."""
    s = MsnpSession(checker or Checker(), transfers, CTX, limits)
    run(s, [(True, f"ANS 89 {ME} 1115371039.15845 17069658\r\n".encode()),
            (False, f"IRO 89 1 1 {PEER} choupi\r\n".encode()), (False, b"ANS 89 OK\r\n")])
    return s


# --- the real capture -------------------------------------------------------------------------------

TRANSCRIPTS = ["msnms_sb0.json", "msnms_ns.json", "msnms_sb2.json", "msnms_sb3.json", "msnms_sb4.json",
               "msnms_sb5.json"]


@pytest.mark.parametrize("name", TRANSCRIPTS)
def test_capture_crosses_byte_exact(name):
    """With everything allowed, each direction of every real MSN connection crosses byte for byte."""
    segs = transcript(name)
    s = MsnpSession(Checker(), ExpectedTransfers(), CTX.with_(connection_id=name))
    out = run(s, segs)
    out += s.connection_closed(True) + s.connection_closed(False)
    assert sends(out, to_client=False) == b"".join(d for fc, d in segs if fc)
    assert sends(out, to_client=True) == b"".join(d for fc, d in segs if not fc)
    assert anomalies(out) == []
    assert not any(isinstance(c, Close) for c in out)


def test_capture_messages_have_sender_recipient_text():
    """msnms_sb2 (answered ring): both people's text/plain messages reach policy with passports; typing does not."""
    checker = Checker()
    s = MsnpSession(checker, None, CTX)
    run(s, transcript("msnms_sb2.json"))
    calls = [(ctx.sender, ctx.recipients, ctx.conversation, text) for text, ctx in checker.calls]
    assert len(calls) == 11
    assert calls[0] == (PEER, (ME,), "17069658", "je te comprend")
    assert calls[2] == (ME, (PEER,), "17069658", "ouai cest ce que jessaye de faire")
    assert calls[3][3] == "je te dit ca mai moi je me la prend"
    assert all(ctx.protocol == "msnp" for _, ctx in checker.calls)
    assert not any("TypingUser" in t for t, _ in checker.calls)


def test_capture_client_initiated_switchboard():
    """msnms_sb5 (USR/CAL/JOI): the server's USR OK confirms the passport, JOI gives the recipient, CAL the id."""
    checker = Checker()
    s = MsnpSession(checker, None, CTX)
    out = run(s, transcript("msnms_sb5.json"))
    assert [e["imguard"]["msnp"]["passport"] for e in records(out, "msnp_logged_in")] == [ME]
    mine = [(ctx.recipients, text) for text, ctx in checker.calls if ctx.sender == ME]
    assert mine[0][0] == (PEER,)
    assert mine[1][1] == "tien jyce est au tel avec damien"
    assert {ctx.conversation for _, ctx in checker.calls} == {"246503"}
    theirs = [text for text, ctx in checker.calls if ctx.sender == PEER]
    assert theirs[0].startswith("je vai pa t'embeter plus lontemps")


def test_a_later_usr_ok_changes_no_identity():
    """Attack transcript: after the switchboard confirmed our passport, a USR OK naming another account (or one
    answering no USR of ours) must NOT relabel our user: an identity_change anomaly, and messages stay ours."""
    checker = Checker()
    s = MsnpSession(checker, None, CTX)
    out = run(s, [(True, f"USR 1 {ME} 1115371039.15845\r\n".encode()), (False, f"USR 1 OK {ME} jujurius\r\n".encode()),
                  (False, b"USR 7 OK security-team@corp.example sec\r\n"), (True, text_msg(2, "hello"))])
    assert anomalies(out) == ["identity_change"] and s.passport == ME
    assert checker.calls[-1][1].sender == ME
    s = MsnpSession(Checker(), None, CTX)
    out = run(s, [(True, f"USR 1 {ME} 1115371039.15845\r\n".encode()),
                  (False, b"USR 9 OK security-team@corp.example sec\r\n")])
    assert anomalies(out) == ["identity_change"] and (s.passport, s.confirmed) == (ME, False)


def test_capture_latin1_accents_decoded_as_utf8():
    """The capture's accented text (UTF-8 on the wire) reaches policy decoded: 'étai', 'parlé'."""
    checker = Checker()
    run(MsnpSession(checker, None, CTX), transcript("msnms_sb3.json"))
    assert any("il étai pareil" in t for t, _ in checker.calls)


def test_chunk_boundaries_same_result():
    """msnms_sb4 split at every offset: same policy calls and same forwarded bytes as in one piece."""
    segs = transcript("msnms_sb4.json")
    client = b"".join(d for fc, d in segs if fc)
    server = b"".join(d for fc, d in segs if not fc)
    ref_checker = Checker()
    ref = MsnpSession(ref_checker, None, CTX)
    run(ref, [(True, client[:100]), (False, server), (True, client[100:])])
    expected = [(t, c.sender) for t, c in ref_checker.calls]
    for cut in range(1, len(server)):
        checker = Checker()
        s = MsnpSession(checker, None, CTX)
        out = run(s, [(True, client[:100]), (False, server[:cut]), (False, server[cut:]), (True, client[100:])])
        assert sends(out, True) == server
        assert [(t, c.sender) for t, c in checker.calls] == expected, cut


# --- message policy -----------------------------------------------------------------------------------

def test_blocked_message_dropped_notice_and_nak():
    """A blocked client MSG (flag N) must NOT reach the server; the client gets a notice MSG and NAK <trid>."""
    s = switchboard(Checker(block=("secret",)))
    out = s.data_received(True, text_msg(95, "the secret plan"))
    assert sends(out, to_client=False) == b""
    back = sends(out, to_client=True)
    dec = CommandDecoder()
    notice, nak = dec.feed(back)
    assert notice.verb == "MSG" and notice.args[:2] == ("imguard", "imguard")
    assert int(notice.args[2]) == len(notice.payload)
    assert b"Content-Type: text/plain" in notice.payload and b"was blocked by imguard: no secret" in notice.payload
    assert nak.raw == b"NAK 95\r\n"


def test_blocked_unacknowledged_message_gets_no_nak():
    """Flag U asks for no acknowledgement: a blocked one gets the notice only."""
    s = switchboard(Checker(block=("secret",)))
    out = s.data_received(True, text_msg(96, "secret", flag="U"))
    assert b"NAK" not in sends(out, True)


def test_masked_message_length_fixed():
    """A masked message is re-framed: the MSG length counts the new body's UTF-8 bytes."""
    s = switchboard(Checker(mask={"hunter2": "*******€"}))
    out = s.data_received(True, text_msg(97, "password hunter2 ok"))
    (cmd,) = CommandDecoder().feed(sends(out, False))
    assert cmd.args[:2] == ("97", "N") and int(cmd.args[2]) == len(cmd.payload)
    assert cmd.payload.endswith("password *******€ ok".encode())


def test_masked_latin1_message_charset_rewritten():
    """A body in ISO-8859-1 masked with non-Latin text goes as UTF-8 and says so."""
    s = switchboard(Checker(mask={"café": "☕"}))
    out = s.data_received(True, text_msg(98, "un café", charset="ISO-8859-1"))
    (cmd,) = CommandDecoder().feed(sends(out, False))
    assert b"charset=UTF-8" in cmd.payload and cmd.payload.endswith("un ☕".encode())


def test_inbound_blocked_message_dropped_with_notice():
    """A blocked message from the peer does not reach our client; it gets a notice naming the sender, in its own
    words (the rule's notice is written for a sender); the context says the server delivered it."""
    checker = Checker(block=("malware",), notice="Your message was blocked.")
    s = switchboard(checker)
    out = s.data_received(False, inbound_msg("get malware here"))
    back = sends(out, True)
    assert b"get malware" not in back and f"A message from {PEER} was blocked".encode() in back
    assert b"Your message" not in back
    assert checker.calls[-1][1].sender == PEER and checker.calls[-1][1].recipients == (ME,)
    assert checker.calls[-1][1].origin == "server"


def test_inbound_masked_message_keeps_sender_prefix():
    s = switchboard(Checker(mask={"1234": "****"}))
    (cmd,) = CommandDecoder().feed(sends(s.data_received(False, inbound_msg("pin 1234")), True))
    assert cmd.args[:2] == (PEER, "choupi") and cmd.payload.endswith(b"pin ****")


# --- MSNFTP -------------------------------------------------------------------------------------------

def invite_msg(trid: int, body: str) -> bytes:
    payload = b"MIME-Version: 1.0\r\nContent-Type: text/x-msmsgsinvite; charset=UTF-8\r\n\r\n" + body.encode()
    return format_command("MSG", str(trid), "N", payload=payload)


def invite_in(body: str) -> bytes:
    payload = b"MIME-Version: 1.0\r\nContent-Type: text/x-msmsgsinvite; charset=UTF-8\r\n\r\n" + body.encode()
    return format_command("MSG", PEER, "choupi", payload=payload)


def msnftp_invitation(name: str, size: int, ip: str, port: int) -> list[tuple[bool, bytes]]:
    """The switchboard exchange of an MSNFTP send: our client invites (cookie 3141), the peer accepts, our
    client's ACCEPT gives the address it listens on (AuthCookie 9911)."""
    return [
        (True, invite_msg(100, "Application-Name: File Transfer\r\nApplication-GUID: {5D3E02AB-6190-11d3-BBBB-"
                               "00C04F795683}\r\nInvitation-Command: INVITE\r\nInvitation-Cookie: 3141\r\n"
                               f"Application-File: {name}\r\nApplication-FileSize: {size}\r\n\r\n")),
        (False, invite_in("Invitation-Command: ACCEPT\r\nInvitation-Cookie: 3141\r\nLaunch-Application: FALSE\r\n"
                          "Request-Data: IP-Address:\r\n\r\n")),
        (True, invite_msg(101, f"Invitation-Command: ACCEPT\r\nInvitation-Cookie: 3141\r\nIP-Address: {ip}"
                               f"\r\nPort: {port}\r\nAuthCookie: 9911\r\nLaunch-Application: FALSE\r\n"
                               "Request-Data: IP-Address:\r\n\r\n")),
    ]


FILE = b"MZ" + bytes(range(256)) * 20 + b"END"          # 5125 bytes: three MSNFTP blocks


def msnftp_setup(transfers):
    """Our client offers FILE over MSNFTP; the peer accepts; our client's ACCEPT gives its address."""
    s = switchboard(Checker(), transfers)
    out = run(s, msnftp_invitation("report.exe", len(FILE), "192.168.1.14", 6891))
    return s, out


def blocks(data: bytes, size: int = 2045) -> bytes:
    out = b""
    for i in range(0, len(data), size):
        chunk = data[i:i + size]
        out += bytes([0, len(chunk) & 0xFF, len(chunk) >> 8]) + chunk
    return out


MSNFTP_ITEMS = [(True, b"VER MSNFTP\r\n"), (False, b"VER MSNFTP\r\n"), (True, f"USR {PEER} 9911\r\n".encode()),
                (False, f"FIL {len(FILE)}\r\n".encode()), (True, b"TFR\r\n"), (False, blocks(FILE)),
                (True, b"BYE 16777989\r\n")]


def msnftp_flow(s: DirectMsnftpSession) -> list:
    """The receiver (TCP client) talks to the sender (TCP server): the whole MSNFTP dialogue up to the data."""
    return run(s, MSNFTP_ITEMS[:-1])


def test_msnftp_transcript_stored():
    """The constructed MSNFTP connection is kept as tests/data/legacy/msnftp_direct.json."""
    save_transcript("msnftp_direct.json", MSNFTP_ITEMS)


def test_msnftp_invitation_registers_offer():
    """The sender's ACCEPT with IP-Address/Port becomes an MsnftpOffer under (ip, port), kind msnftp."""
    transfers = ExpectedTransfers()
    s, out = msnftp_setup(transfers)
    offer = find_msnftp_offer(transfers, "192.168.1.14", 6891)
    assert offer is not None and offer.name == "report.exe" and offer.size == len(FILE)
    assert offer.sender == ME and offer.receiver == PEER and offer.auth_cookie == "9911"
    assert offer.listener_is_sender and offer.context.connection_id == "sb1"
    assert [e["imguard"]["msnp"]["name"] for e in records(out, "msnftp_offer")] == ["report.exe"]
    assert len(records(out, "msnftp_expected")) == 1
    assert sends(out, False).count(b"MSG 10") == 2          # invitations cross unchanged


def test_msnftp_allowed_file_released_after_verdict():
    """The blocks are held until the verdict (sender gets our BYE), then reach the receiver byte-exact."""
    transfers = ExpectedTransfers()
    msnftp_setup(transfers)
    offer = find_msnftp_offer(transfers, "192.168.1.14", 6891)
    s = DirectMsnftpSession(Checker(), transfers, ChatContext(connection_id="d1"), offer)
    out = msnftp_flow(s)
    assert sends(out, True) == b"VER MSNFTP\r\n" + f"FIL {len(FILE)}\r\n".encode()     # no file byte yet
    assert sends(out, False).endswith(b"BYE 16777989\r\n")
    (insp,) = inspects(out)
    assert insp.data == FILE and insp.name == "report.exe" and insp.context.transfer_mechanism == "msnftp"
    assert insp.context.sender == ME and insp.context.recipients == (PEER,)
    out = s.file_verdict(insp.transfer_id, FileReport("report.exe", "report.exe", len(FILE)), ALLOWED)
    assert sends(out, True) == blocks(FILE)
    assert s.data_received(True, b"BYE 16777989\r\n") == []             # swallowed: the sender had ours
    assert s.connection_closed(False) == [Close("msnftp transfer done")]    # the sender's close is passed on
    assert s.transfer.holds.held_bytes == 0 and s.transfer.holds.in_flight == 0


def test_msnftp_blocked_file_cancel_and_notify():
    """Blocked: the receiver gets a cancel block and nothing of the file; the switchboard is asked to notify."""
    transfers = ExpectedTransfers()
    sb, _ = msnftp_setup(transfers)
    offer = find_msnftp_offer(transfers, "192.168.1.14", 6891)
    s = DirectMsnftpSession(Checker(), transfers, ChatContext(connection_id="d1"), offer)
    (insp,) = inspects(msnftp_flow(s))
    out = s.file_verdict(insp.transfer_id, FileReport("report.exe", "report.exe", len(FILE)), BLOCKED)
    assert sends(out, True) == b"\x01\x00\x00"
    assert any(isinstance(c, Close) for c in out)
    (note,) = notifies(out)
    assert note.connection_id == "sb1" and note.protocol == "msnp" and note.decision is BLOCKED
    assert note.event()["imguard"]["msnftp"]["name"] == "report.exe"
    notice = sb.notice(note.text)
    assert b"report.exe" in notice[0].data and b"blocked (no programs)" in notice[0].data


def msnftp_inbound_invitation(name: str, size: int, ip: str, port: int) -> list[tuple[bool, bytes]]:
    """The switchboard exchange of an MSNFTP file *to* our client: PEER invites (cookie 2718), our client accepts,
    PEER's ACCEPT gives the address it listens on (AuthCookie 8822)."""
    return [
        (False, invite_in("Application-Name: File Transfer\r\nApplication-GUID: {5D3E02AB-6190-11d3-BBBB-"
                          "00C04F795683}\r\nInvitation-Command: INVITE\r\nInvitation-Cookie: 2718\r\n"
                          f"Application-File: {name}\r\nApplication-FileSize: {size}\r\n\r\n")),
        (True, invite_msg(100, "Invitation-Command: ACCEPT\r\nInvitation-Cookie: 2718\r\nLaunch-Application: "
                               "FALSE\r\nRequest-Data: IP-Address:\r\n\r\n")),
        (False, invite_in(f"Invitation-Command: ACCEPT\r\nInvitation-Cookie: 2718\r\nIP-Address: {ip}\r\n"
                          f"Port: {port}\r\nAuthCookie: 8822\r\nLaunch-Application: FALSE\r\n"
                          "Request-Data: IP-Address:\r\n\r\n")),
    ]


def inbound_msnftp_items(payload: bytes = FILE) -> list[tuple[bool, bytes]]:
    """Our client (the TCP client, receiver) on PEER's MSNFTP listener."""
    return [(True, b"VER MSNFTP\r\n"), (False, b"VER MSNFTP\r\n"), (True, f"USR {ME} 8822\r\n".encode()),
            (False, f"FIL {len(payload)}\r\n".encode()), (True, b"TFR\r\n"), (False, blocks(payload))]


def test_msnftp_inbound_offer_and_blocked_file():
    """PEER sends our client a file over MSNFTP: the offer is inbound (the invitation came from the switchboard),
    our client is the receiver and the TCP client; blocked, it gets the cancel block and nothing of the file, and
    the notice for its switchboard is in its own words."""
    transfers = ExpectedTransfers()
    sb = switchboard(Checker(), transfers)
    out = run(sb, msnftp_inbound_invitation("setup.exe", len(FILE), "10.1.2.3", 6892))
    offer = find_msnftp_offer(transfers, "10.1.2.3", 6892)
    assert not offer.outbound and offer.listener_is_sender and (offer.sender, offer.receiver) == (PEER, ME)
    assert [e["imguard"]["msnp"]["outbound"] for e in records(out, "msnftp_offer")] == [False]
    s = DirectMsnftpSession(Checker(), transfers, ChatContext(connection_id="d2"), offer)
    out = run(s, inbound_msnftp_items())
    assert FILE[:100] not in sends(out, True) and sends(out, False).endswith(b"BYE 16777989\r\n")
    (insp,) = inspects(out)
    assert (insp.context.origin, insp.context.sender, insp.context.recipients) == ("server", PEER, (ME,))
    decision = Decision(action=BLOCK, matches=BLOCKED.matches, notice="Your file was blocked.")
    out = s.file_verdict(insp.transfer_id, FileReport("setup.exe", "setup.exe", len(FILE)), decision)
    assert sends(out, True) == b"\x01\x00\x00" and any(isinstance(c, Close) for c in out)
    (note,) = notifies(out)
    assert note.connection_id == "sb1" and note.text == f"imguard: the file 'setup.exe' from {PEER} was blocked " \
                                                        "(no programs)"


def test_msnftp_inbound_allowed_file_reaches_our_client_byte_exact():
    transfers = ExpectedTransfers()
    run(switchboard(Checker(), transfers), msnftp_inbound_invitation("notes.txt", len(FILE), "10.1.2.3", 6893))
    s = DirectMsnftpSession(Checker(), transfers, ChatContext(connection_id="d3"),
                            find_msnftp_offer(transfers, "10.1.2.3", 6893))
    (insp,) = inspects(run(s, inbound_msnftp_items()))
    out = s.file_verdict(insp.transfer_id, FileReport("notes.txt", "notes.txt", len(FILE)),
                         Decision(action=ALLOW, notice="scanned"))
    assert sends(out, True) == blocks(FILE) and not notifies(out)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 2048])
def test_msnftp_chunk_boundaries(size):
    """The sender's blocks split at any size: the same file is inspected."""
    transfers = ExpectedTransfers()
    msnftp_setup(transfers)
    s = DirectMsnftpSession(Checker(), transfers, ChatContext(), find_msnftp_offer(transfers, "192.168.1.14", 6891))
    run(s, [(True, b"VER MSNFTP\r\n"), (False, b"VER MSNFTP\r\n"), (True, f"USR {PEER} 9911\r\n".encode()),
            (False, f"FIL {len(FILE)}\r\n".encode()), (True, b"TFR\r\n")])
    data = blocks(FILE)
    out = run(s, [(False, data[i:i + size]) for i in range(0, len(data), size)])
    assert [i.data for i in inspects(out)] == [FILE]


def test_msnftp_sender_closes_early_truncated():
    transfers = ExpectedTransfers()
    msnftp_setup(transfers)
    s = DirectMsnftpSession(Checker(), transfers, ChatContext(), find_msnftp_offer(transfers, "192.168.1.14", 6891))
    run(s, [(False, f"FIL {len(FILE)}\r\n".encode()), (True, b"TFR\r\n")])
    s.data_received(False, blocks(FILE)[:3000])
    (insp,) = inspects(s.connection_closed(False))
    assert insp.truncated and len(insp.data) == 2045


def msnftp_session(limits: MsnpLimits = MsnpLimits()) -> DirectMsnftpSession:
    """A DirectMsnftpSession on the connection announced by msnftp_setup (the receiver is the TCP client)."""
    transfers = ExpectedTransfers()
    msnftp_setup(transfers)
    return DirectMsnftpSession(Checker(), transfers, ChatContext(connection_id="d1"),
                               find_msnftp_offer(transfers, "192.168.1.14", 6891), limits)


def test_msnftp_sender_cancel_abandons_the_file():
    """The sender's cancel block: the receiver gets a cancel block, none of the held blocks; nobody is told."""
    s = msnftp_session()
    run(s, MSNFTP_ITEMS[:5])
    out = s.data_received(False, blocks(FILE)[:2048] + b"\x01\x00\x00")
    assert anomalies(out) == ["msnftp_cancelled"] and not notifies(out)
    assert sends(out, True) == b"\x01\x00\x00" and sends(out, False) == b"" and isinstance(out[-1], Close)
    assert s.transfer.holds.held_bytes == 0 and s.transfer.holds.in_flight == 0
    assert s.data_received(False, b"more") == [] and s.connection_closed(True) == []


def test_msnftp_announced_size_over_the_bound_is_cut():
    """A FIL over msnp_max_held_bytes: the FIL does not cross, the receiver is cancelled, the sender told."""
    s = msnftp_session(MsnpLimits(msnp_max_held_bytes=1000))
    out = run(s, MSNFTP_ITEMS[:4])
    assert anomalies(out) == ["msnftp_too_large"] and isinstance(out[-1], Close)
    assert sends(out, True) == b"VER MSNFTP\r\n\x01\x00\x00"
    (note,) = notifies(out)
    assert note.connection_id == "sb1" and "report.exe" in note.text and "larger than 1000 bytes" in note.text


def test_msnftp_inbound_cut_cancels_the_outside_sender_and_tells_our_receiver():
    """PEER's file over the bound: PEER (outside, still waiting for a BYE) gets MSNFTP's receiver cancel, our client
    (the receiver) the cancel block and, on its switchboard, a notice naming PEER."""
    transfers = ExpectedTransfers()
    run(switchboard(Checker(), transfers), msnftp_inbound_invitation("setup.exe", len(FILE), "10.1.2.3", 6894))
    s = DirectMsnftpSession(Checker(), transfers, ChatContext(connection_id="d4"),
                            find_msnftp_offer(transfers, "10.1.2.3", 6894), MsnpLimits(msnp_max_held_bytes=1000))
    out = run(s, inbound_msnftp_items()[:4])
    assert anomalies(out) == ["msnftp_too_large"] and isinstance(out[-1], Close)
    assert sends(out, False).endswith(b"CCL\r\n") and sends(out, True).endswith(b"\x01\x00\x00")
    (note,) = notifies(out)
    assert note.connection_id == "sb1" and note.text == (f"imguard: the file 'setup.exe' from {PEER} was stopped: "
                                                         "it is larger than 1000 bytes and could not be inspected")


def test_msnftp_transfer_running_past_the_bound_is_cut():
    """Without a FIL the blocks are held up to the bound; past it the file is stopped, nothing delivered."""
    s = msnftp_session(MsnpLimits(msnp_max_held_bytes=3000))
    run(s, [(True, b"VER MSNFTP\r\n"), (False, b"VER MSNFTP\r\n"), (True, b"TFR\r\n")])
    out = s.data_received(False, blocks(FILE))
    assert anomalies(out) == ["msnftp_too_large"] and not inspects(out) and isinstance(out[-1], Close)
    assert sends(out, True) == b"\x01\x00\x00" and len(notifies(out)) == 1
    assert s.transfer.holds.held_bytes == 0


def test_msnftp_receiver_leaving_mid_file_ends_it():
    """The receiver closes before the file is whole: the sender gets no BYE (nothing arrived), nothing is held."""
    s = msnftp_session()
    run(s, MSNFTP_ITEMS[:5])
    assert s.data_received(False, blocks(FILE)[:2048]) == []
    out = s.connection_closed(True)
    assert anomalies(out) == ["msnftp_receiver_gone"] and isinstance(out[-1], Close)
    assert sends(out, False) == b"" and sends(out, True) == b"" and not notifies(out)
    assert s.transfer.holds.held_bytes == 0 and s.transfer.holds.in_flight == 0


def test_msnftp_sender_closing_before_any_block_is_empty():
    s = msnftp_session()
    run(s, MSNFTP_ITEMS[:5])
    out = s.connection_closed(False)
    assert anomalies(out) == ["msnftp_empty"] and isinstance(out[-1], Close) and not inspects(out)


def test_msnftp_unannounced_and_bad_cookie():
    s = DirectMsnftpSession(Checker(), ExpectedTransfers(), ChatContext(), None)
    out = s.data_received(True, b"VER MSNFTP\r\n")
    assert anomalies(out) == ["msnftp_unannounced"] and isinstance(out[-1], Close)
    transfers = ExpectedTransfers()
    msnftp_setup(transfers)
    s = DirectMsnftpSession(Checker(), transfers, ChatContext(), find_msnftp_offer(transfers, "192.168.1.14", 6891))
    assert anomalies(s.data_received(True, f"USR {PEER} 1234\r\n".encode())) == ["msnftp_bad_cookie"]


def test_msnftp_oversized_offer_refused():
    s = switchboard(Checker(), ExpectedTransfers(), MsnpLimits(msnp_max_held_bytes=1000))
    out = s.data_received(True, invite_msg(100, f"Application-GUID: {FT_GUID}\r\nInvitation-Command: INVITE\r\n"
                                               "Invitation-Cookie: 1\r\nApplication-File: big.iso\r\n"
                                               "Application-FileSize: 5000\r\n\r\n"))
    assert sends(out, False) == b"" and b"cannot be inspected" in sends(out, True)
    assert records(out, "msnp_file_refused")


# --- MSNSLP in-band -----------------------------------------------------------------------------------

SID = 4242
CALL_ID = "{9A1B2C3D-0000-4000-8000-00000000ABCD}"


def p2p_msg(trid: int, header: P2PHeader, chunk: bytes, footer: int, dest: str = PEER, inbound=False) -> bytes:
    payload = (b"MIME-Version: 1.0\r\nContent-Type: application/x-msnmsgrp2p\r\nP2P-Dest: " + dest.encode() +
               b"\r\n\r\n" + build_p2p(header, chunk, footer))
    if inbound:
        return format_command("MSG", PEER, "choupi", payload=payload)
    return format_command("MSG", str(trid), "D", payload=payload)


def slp_invite(name: str, size: int, sender=ME, receiver=PEER, sid: int = SID) -> bytes:
    context = base64.b64encode(build_file_context(name, size)).decode()
    body = (f"EUF-GUID: {FT_GUID}\r\nSessionID: {sid}\r\nAppID: 2\r\nContext: {context}\r\n\r\n\x00")
    return (f"INVITE MSNMSGR:{receiver} MSNSLP/1.0\r\nTo: <msnmsgr:{receiver}>\r\nFrom: <msnmsgr:{sender}>\r\n"
            f"Via: MSNSLP/1.0/TLP ;branch={{33333333-4444-5555-6666-777777777777}}\r\nCSeq: 0\r\n"
            f"Call-ID: {CALL_ID}\r\nMax-Forwards: 0\r\nContent-Type: application/x-msnmsgr-sessionreqbody\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}").encode() + b"\x00"


def slp_chunks(slp: bytes, ident: int, size: int = 1202) -> list[tuple[P2PHeader, bytes]]:
    return [(P2PHeader(0, ident, off, len(slp), len(slp[off:off + size]), 0), slp[off:off + size])
            for off in range(0, len(slp), size)]


def data_chunks(data: bytes, size: int = 1202, sid: int = SID) -> list[tuple[P2PHeader, bytes]]:
    return [(P2PHeader(sid, 900, off, len(data), len(data[off:off + size]), 0x01000030), data[off:off + size])
            for off in range(0, len(data), size)]


def test_file_context_layout():
    """The Context: size at offset 8, UTF-16LE name at offset 20."""
    raw = build_file_context("résumé.pdf", 123456)
    assert raw[8:16] == (123456).to_bytes(8, "little") and raw[20:40] == "résumé.pdf".encode("utf-16-le")
    assert parse_file_context(base64.b64encode(raw).decode()) == ("résumé.pdf", 123456)


def outbound_slp_session(checker=None):
    s = switchboard(checker)
    items = [(True, p2p_msg(200 + i, h, c, 0)) for i, (h, c) in enumerate(slp_chunks(slp_invite("report.exe",
                                                                                                 len(FILE)), 77))]
    ok = b"MSNSLP/1.0 200 OK\r\nTo: <msnmsgr:" + ME.encode() + b">\r\n\r\n\x00"
    items.append((False, p2p_msg(0, P2PHeader(0, 500, 0, len(ok), len(ok), 0), ok, 0, ME, inbound=True)))
    out = run(s, items)
    return s, out, items


def test_msnslp_invite_is_an_offer_and_crosses():
    """A two-chunk SLP INVITE is reassembled: name/size/session from the Context; it crosses unchanged."""
    s, out, items = outbound_slp_session()
    assert sends(out, False) == b"".join(d for fc, d in items if fc)
    assert sends(out, True) == b"".join(d for fc, d in items if not fc)
    (offer,) = records(out, "msnslp_offer")
    assert offer["imguard"]["msnp"]["name"] == "report.exe" and offer["imguard"]["msnp"]["size"] == len(FILE)
    assert offer["imguard"]["msnp"]["session_id"] == SID


def test_msnslp_data_held_acked_then_released():
    """Data chunks are held and ACKed by the gateway; allowed, they go on in order and the SB's ACKs are eaten."""
    s, _, items = outbound_slp_session()
    msgs = [p2p_msg(300 + i, h, c, 2) for i, (h, c) in enumerate(data_chunks(FILE))]
    save_transcript("msnslp_inband.json", items + [(True, m) for m in msgs])
    out = run(s, [(True, m) for m in msgs])
    assert sends(out, False) == b""
    assert sends(out, True) == b"".join(f"ACK {300 + i}\r\n".encode() for i in range(len(msgs)))
    (insp,) = inspects(out)
    assert insp.data == FILE and insp.name == "report.exe" and insp.transfer_id == f"msnslp:sb1:{SID}"
    assert insp.context.sender == ME and insp.context.recipients == (PEER,)
    assert insp.context.transfer_mechanism == "msnslp"
    out = s.file_verdict(insp.transfer_id, FileReport("report.exe", "report.exe", len(FILE)), ALLOWED)
    assert sends(out, False) == b"".join(msgs)
    assert s.data_received(False, b"ACK 300\r\nACK 301\r\n") == []
    assert sends(s.data_received(False, b"ACK 12\r\n"), True) == b"ACK 12\r\n"


def test_msnslp_overlapping_offsets_with_different_content_are_blocked():
    """Evasion: a data chunk whose offset overlaps the previous one with other bytes. The receiver would assemble
    one copy, the scanner saw the other: the file is cut (p2p_overlap), never inspected, nothing reaches the
    server; the same bytes re-sent over an overlap are fine."""
    def chunk(trid, offset, data):
        return True, p2p_msg(trid, P2PHeader(SID, 900 + trid, offset, len(FILE), len(data), 0x01000030), data, 2)
    s, _, _ = outbound_slp_session()
    evil = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR" + b"B" * 366
    out = run(s, [chunk(300, 0, FILE[:1200]), chunk(301, 800, evil), chunk(302, 1200, FILE[1200:])])
    assert "p2p_overlap" in anomalies(out) and not inspects(out) and sends(out, False) == b""
    s, _, _ = outbound_slp_session()
    out = run(s, [chunk(300, 0, FILE[:1200]), chunk(301, 800, FILE[800:])])
    (insp,) = inspects(out)
    assert insp.data == FILE and not anomalies(out)


def test_msnslp_blocked_sends_bye_and_notice():
    """Blocked: nothing reaches the server; our client gets an SLP BYE for the call and a notice."""
    s, _, _ = outbound_slp_session()
    out = run(s, [(True, p2p_msg(300 + i, h, c, 2)) for i, (h, c) in enumerate(data_chunks(FILE))])
    (insp,) = inspects(out)
    out = s.file_verdict(insp.transfer_id, FileReport("report.exe", "report.exe", len(FILE)), BLOCKED)
    assert sends(out, False) == b""
    back = CommandDecoder().feed(sends(out, True))
    assert back[0].args[0] == PEER and b"BYE MSNMSGR:" + ME.encode() in back[0].payload
    assert CALL_ID.encode() in back[0].payload
    assert back[1].args[0] == "imguard" and b"report.exe" in back[1].payload


def test_msnslp_inbound_file_held_until_verdict():
    """A file *to* our client: the chunks from the server are held and released to the client when allowed."""
    s = switchboard()
    slp = slp_invite("pic.jpg", 3000, sender=PEER, receiver=ME)
    run(s, [(False, p2p_msg(0, h, c, 0, ME, inbound=True)) for h, c in slp_chunks(slp, 10)])
    data = b"\xff\xd8" + b"x" * 2998
    msgs = [p2p_msg(0, h, c, 2, ME, inbound=True) for h, c in data_chunks(data)]
    out = run(s, [(False, m) for m in msgs])
    assert sends(out, True) == b""
    (insp,) = inspects(out)
    assert insp.context.sender == PEER and insp.context.recipients == (ME,)
    out = s.file_verdict(insp.transfer_id, FileReport("pic.jpg", "pic.jpg", 3000), ALLOWED)
    assert sends(out, True) == b"".join(msgs)


def inbound_slp_session():
    """PEER invites our client to a file (the INVITE comes from the switchboard); our client answers 200 OK."""
    s = switchboard()
    slp = slp_invite("pic.exe", len(FILE), sender=PEER, receiver=ME)
    out = run(s, [(False, p2p_msg(0, h, c, 0, ME, inbound=True)) for h, c in slp_chunks(slp, 10)])
    ok = b"MSNSLP/1.0 200 OK\r\nTo: <msnmsgr:" + PEER.encode() + b">\r\n\r\n\x00"
    out += s.data_received(True, p2p_msg(20, P2PHeader(0, 11, 0, len(ok), len(ok), 0), ok, 0))
    return s, out


def test_msnslp_inbound_file_blocked_receiver_gets_bye_and_its_own_notice():
    """An inbound file blocked: our client (the receiver) gets none of the chunks, an SLP BYE from PEER and a
    notice in its own words naming the sender (not the rule's notice, written for a sender)."""
    s, out = inbound_slp_session()
    [offer] = records(out, "msnslp_offer")
    assert offer["imguard"]["msnp"]["outbound"] is False
    msgs = [p2p_msg(0, h, c, 2, ME, inbound=True) for h, c in data_chunks(FILE)]
    out = run(s, [(False, m) for m in msgs])
    assert sends(out, True) == b"" and sends(out, False) == b""
    (insp,) = inspects(out)
    assert (insp.context.origin, insp.context.sender, insp.context.recipients) == ("server", PEER, (ME,))
    decision = Decision(action=BLOCK, matches=BLOCKED.matches, notice="Your file was blocked.")
    out = s.file_verdict(insp.transfer_id, FileReport("pic.exe", "pic.exe", len(FILE)), decision)
    back = CommandDecoder().feed(sends(out, True))
    assert back[0].args[0] == PEER and b"BYE MSNMSGR:" + ME.encode() in back[0].payload
    assert back[1].args[0] == "imguard"
    assert back[1].payload.endswith(f"imguard: the file 'pic.exe' from {PEER} was blocked (no programs)".encode())
    assert FILE[:100] not in sends(out, True) and sends(out, False) == b""
    assert held(s) == (0, 0)


def test_msnslp_inbound_allowed_file_crosses_without_a_notice():
    s, _ = inbound_slp_session()
    msgs = [p2p_msg(0, h, c, 2, ME, inbound=True) for h, c in data_chunks(FILE)]
    (insp,) = inspects(run(s, [(False, m) for m in msgs]))
    out = s.file_verdict(insp.transfer_id, FileReport("pic.exe", "pic.exe", len(FILE)),
                         Decision(action=ALLOW, notice="scanned by imguard"))
    assert sends(out, True) == b"".join(msgs)


def test_msnslp_gap_fails_closed():
    s, _, _ = outbound_slp_session()
    chunks = data_chunks(FILE)
    out = run(s, [(True, p2p_msg(300, *chunks[0], 2)), (True, p2p_msg(302, *chunks[2], 2))])
    assert "p2p_bad_chunk" in anomalies(out) and sends(out, False) == b"" and not inspects(out)


def data_msgs(data: bytes = FILE, trid: int = 300, size: int = 1202, sid: int = SID) -> list[bytes]:
    return [p2p_msg(trid + i, h, c, 2) for i, (h, c) in enumerate(data_chunks(data, size, sid))]


def held(s: MsnpSession) -> tuple[int, int]:
    """The switchboard's held MSNSLP files: (bytes, files in flight)."""
    return s.holds.held_bytes, s.holds.in_flight


def test_msnslp_memory_back_to_zero_after_allow_and_block():
    """While a file is held its bytes (file and MSGs) count in the connection's holds; after the verdict, either
    way, nothing is held and nothing is in flight."""
    for decision in (ALLOWED, BLOCKED):
        s, _, _ = outbound_slp_session()
        msgs = data_msgs()
        run(s, [(True, m) for m in msgs[:-1]])
        assert held(s) == (sum(len(m) for m in msgs[:-1]) + len(FILE) - len(data_chunks(FILE)[-1][1]), 1)
        (insp,) = inspects(s.data_received(True, msgs[-1]))
        assert held(s) == (sum(len(m) for m in msgs) + len(FILE), 1)
        out = s.file_verdict(insp.transfer_id, FileReport("report.exe", "report.exe", len(FILE)), decision)
        assert held(s) == (0, 0)
        assert sends(out, False) == (b"".join(msgs) if decision is ALLOWED else b"")
        assert s.file_verdict(insp.transfer_id, FileReport("report.exe", "report.exe", len(FILE)), decision) == []


def test_msnslp_block_without_notice_uses_the_tracker_text_and_allow_notice_is_told():
    """A block with no notice of its own: the tracker's text (file, sender, receiver, rule titles) after the BYE; an
    allow with a notice: the MSGs, then the notice."""
    s, _, _ = outbound_slp_session()
    (insp,) = inspects(run(s, [(True, m) for m in data_msgs()]))
    out = s.file_verdict(insp.transfer_id, FileReport("report.exe", "report.exe", len(FILE)), BLOCKED)
    bye, notice = CommandDecoder().feed(sends(out, True))
    assert b"BYE MSNMSGR:" in bye.payload and not anomalies(out)
    assert notice.payload.endswith(f"imguard: the file 'report.exe' from {ME} to {PEER} was blocked "
                                   "(no programs)".encode())
    s, _, _ = outbound_slp_session()
    msgs = data_msgs()
    (insp,) = inspects(run(s, [(True, m) for m in msgs]))
    out = s.file_verdict(insp.transfer_id, FileReport("report.exe", "report.exe", len(FILE)),
                         Decision(action=ALLOW, notice="scanned by imguard"))
    assert sends(out, False) == b"".join(msgs)
    (notice,) = CommandDecoder().feed(sends(out, True))
    assert notice.args[0] == "imguard" and notice.payload.endswith(b"scanned by imguard")


def test_msnslp_gap_cut_tells_our_client_and_frees_the_file():
    """A gap cuts the file (p2p_bad_chunk): our client gets the BYE and the malformed-transfer notice, nothing
    reached the server, nothing stays held; a later chunk is an overrun, dropped."""
    s, _, _ = outbound_slp_session()
    msgs = data_msgs()
    out = run(s, [(True, msgs[0]), (True, msgs[2])])
    assert anomalies(out) == ["p2p_bad_chunk"] and sends(out, False) == b"" and not inspects(out)
    (anomaly,) = records(out, "anomaly")
    assert anomaly["imguard"]["anomaly"]["session_id"] == SID and anomaly["imguard"]["anomaly"]["name"] == "report.exe"
    ack, bye, notice = CommandDecoder().feed(sends(out, True))
    assert ack.raw == b"ACK 300\r\n" and b"BYE MSNMSGR:" in bye.payload and CALL_ID.encode() in bye.payload
    assert b"could not be inspected (malformed transfer)" in notice.payload
    assert held(s) == (0, 0)
    out = s.data_received(True, msgs[3])
    assert anomalies(out) == ["p2p_overrun"] and sends(out, False) == b"" and sends(out, True) == b""


def test_msnslp_senders_leg_closing_abandons_the_file():
    """The sender's leg closes before the last byte: p2p_incomplete, nothing forwarded, nothing held, no BYE; the
    receiver's leg closing does not end a file (the sender may still finish it and be told a block)."""
    s, _, _ = outbound_slp_session()
    msgs = data_msgs()
    run(s, [(True, m) for m in msgs[:2]])
    assert s.connection_closed(False) == [] and held(s)[1] == 1       # the receiver's side: the file goes on
    out = s.connection_closed(True)
    assert anomalies(out) == ["p2p_incomplete"] and not [c for c in out if not isinstance(c, Anomaly)]
    assert records(out)[0]["imguard"]["anomaly"]["bytes_held"] == 2 * 1202
    assert held(s) == (0, 0)


def test_msnslp_file_being_inspected_survives_the_senders_close():
    """The whole file is in and out for inspection when the sender's leg closes: the verdict still releases it."""
    s, _, _ = outbound_slp_session()
    msgs = data_msgs()
    (insp,) = inspects(run(s, [(True, m) for m in msgs]))
    assert s.connection_closed(True) == []
    out = s.file_verdict(insp.transfer_id, FileReport("report.exe", "report.exe", len(FILE)), ALLOWED)
    assert sends(out, False) == b"".join(msgs) and held(s) == (0, 0)


def test_msnslp_framing_error_drops_held_files_quietly():
    """A framing error closes the connection: a held file goes with it, with only the framing error recorded."""
    s, _, _ = outbound_slp_session()
    run(s, [(True, m) for m in data_msgs()[:2]])
    out = s.data_received(True, b"MSG 5 N 99999999\r\n")
    assert anomalies(out) == ["payload_too_large"] and isinstance(out[-1], Close) and sends(out, False) == b""
    assert held(s) == (0, 0)


def test_msnslp_connection_hold_bound_cuts_the_file():
    """The connection's bound (held_bound: the file and the MSGs that carry it) stops a file whose framing outweighs
    its bytes: tiny chunks of a file within msnp_max_held_bytes are cut as too large, told, and freed."""
    limits = MsnpLimits(msnp_max_held_bytes=len(FILE), msnp_max_transfers=1)
    s = switchboard(limits=limits)
    run(s, [(True, p2p_msg(200 + i, h, c, 0)) for i, (h, c) in enumerate(slp_chunks(slp_invite("report.exe",
                                                                                                len(FILE)), 77))])
    out = run(s, [(True, m) for m in data_msgs(size=8)])
    assert anomalies(out) == ["p2p_too_large", "p2p_overrun"]       # the chunks after the cut: one overrun
    assert records(out, "anomaly")[0]["imguard"]["anomaly"]["reason"] == "connection or gateway hold limit"
    assert not inspects(out) and sends(out, False) == b""
    assert b"larger than" in sends(out, True) and b"BYE MSNMSGR:" in sends(out, True)
    assert held(s) == (0, 0)


def test_msnslp_reused_session_id_abandons_the_old_file():
    """A new INVITE with the SessionID of a file still out for inspection: the old one is given up (its verdict
    decides nothing) and the new file has a transfer id of its own."""
    s, _, _ = outbound_slp_session()
    (old,) = inspects(run(s, [(True, m) for m in data_msgs()]))
    out = run(s, [(True, p2p_msg(400 + i, h, c, 0)) for i, (h, c) in enumerate(slp_chunks(slp_invite(
        "second.txt", 3000), 78))])
    assert anomalies(out) == ["p2p_incomplete"] and records(out, "msnslp_offer")
    second = b"hello " * 500
    new_msgs = data_msgs(second, trid=500)
    assert s.file_verdict(old.transfer_id, FileReport("report.exe", "report.exe", len(FILE)), ALLOWED) == []
    (new,) = inspects(run(s, [(True, m) for m in new_msgs]))
    assert new.transfer_id != old.transfer_id and new.data == second
    assert s.file_verdict(old.transfer_id, FileReport("report.exe", "report.exe", len(FILE)), ALLOWED) == []
    out = s.file_verdict(new.transfer_id, FileReport("second.txt", "second.txt", len(second)), ALLOWED)
    assert sends(out, False) == b"".join(new_msgs) and held(s) == (0, 0)


def test_msnslp_a_held_file_is_never_forgotten():
    """Finished file sessions are forgotten (at most 4 x msnp_max_transfers remembered), a held one never: its later
    chunks stay held (forgotten, they would cross unscanned)."""
    s = switchboard(limits=MsnpLimits(msnp_max_transfers=2))

    def invite(sid: int, name: str, trid: int) -> list[tuple[bool, bytes]]:
        return [(True, p2p_msg(trid + i, h, c, 0)) for i, (h, c) in enumerate(slp_chunks(slp_invite(
            name, len(FILE), sid=sid), sid))]

    first = data_msgs(sid=1, trid=100)
    run(s, invite(1, "first.exe", 10) + [(True, first[0])])
    for sid in range(2, 11):
        (insp,) = inspects(run(s, invite(sid, f"f{sid}.bin", 1000 * sid) + [(True, m) for m in data_msgs(
            sid=sid, trid=1000 * sid + 10)]))
        s.file_verdict(insp.transfer_id, FileReport("", "", len(FILE)), ALLOWED)
    assert len(s._p2p) == 8 and 1 in s._p2p
    out = run(s, [(True, m) for m in first[1:]])
    assert sends(out, False) == b""
    (insp,) = inspects(out)
    assert insp.data == FILE and insp.name == "first.exe"


# --- bad input --------------------------------------------------------------------------------------

def test_payload_length_over_limit_closes():
    """A length that lies (above msnp_max_payload) is an anomaly and closes: the gateway will not wait for it."""
    s = switchboard()
    out = s.data_received(True, b"MSG 5 N 99999999\r\nMIME-Version: 1.0\r\n")
    assert anomalies(out) == ["payload_too_large"] and isinstance(out[-1], Close)
    assert sends(out, False) == b""


def test_non_numeric_length_closes():
    out = switchboard().data_received(True, b"MSG 5 N -12\r\nhello")
    assert anomalies(out) == ["bad_payload_length"]


def test_line_too_long_closes():
    out = switchboard().data_received(True, b"CAL 5 " + b"a" * 9000)
    assert anomalies(out) == ["line_too_long"]


def test_payload_that_never_comes_is_truncated_at_close():
    s = switchboard()
    assert s.data_received(True, text_msg(5, "hello")[:-2]) == []
    assert anomalies(s.connection_closed(True)) == ["truncated_command"]


def test_truncated_p2p_chunk_dropped():
    """A P2P header that announces more bytes than the MSG carries is an anomaly; the MSG is dropped."""
    s = switchboard()
    h = P2PHeader(SID, 1, 0, 5000, 1202, 0x01000030)
    payload = (b"MIME-Version: 1.0\r\nContent-Type: application/x-msnmsgrp2p\r\nP2P-Dest: x\r\n\r\n" + h.pack() +
               b"abc")
    out = s.data_received(True, format_command("MSG", "7", "D", payload=payload))
    assert anomalies(out) == ["p2p_truncated"] and sends(out, False) == b""
    assert sends(out, True) == b"NAK 7\r\n"


def test_bad_utf16_name_is_an_anomaly():
    raw = bytearray(build_file_context("x", 10))
    raw[20:24] = b"\x00\xd8\x41\x00"      # a lone high surrogate
    context = base64.b64encode(bytes(raw)).decode()
    body = f"EUF-GUID: {FT_GUID}\r\nSessionID: 9\r\nAppID: 2\r\nContext: {context}\r\n\r\n\x00"
    slp = (f"INVITE MSNMSGR:{PEER} MSNSLP/1.0\r\nTo: <msnmsgr:{PEER}>\r\nFrom: <msnmsgr:{ME}>\r\nCall-ID: {{1}}\r\n"
           f"Content-Type: application/x-msnmsgr-sessionreqbody\r\n\r\n{body}").encode()
    s = switchboard()
    out = s.data_received(True, p2p_msg(8, P2PHeader(0, 1, 0, len(slp), len(slp), 0), slp, 0))
    assert "bad_utf16" in anomalies(out)


def test_decoder_raw_concatenates_to_input():
    data = b"".join(d for fc, d in transcript("msnms_ns.json") if not fc)
    events = CommandDecoder().feed(data)
    assert b"".join(e.raw for e in events) == data
    ubx = [e for e in events if isinstance(e, Command) and e.verb == "UBX"]
    assert ubx and ubx[0].payload.startswith(b"<Data>")


def test_direct_connection_invite_refused_with_decline():
    """A transreqbody INVITE (direct connection: the file would go around the gateway) does not reach the
    server; our client gets a 603 Decline for that Call-ID and falls back to the switchboard."""
    s = switchboard()
    body = "Bridges: TRUDPv1 TCPv1\r\nNetID: 0\r\nConn-Type: Direct-Connect\r\nUPnPNat: false\r\n\r\n\x00"
    slp = (f"INVITE MSNMSGR:{PEER} MSNSLP/1.0\r\nTo: <msnmsgr:{PEER}>\r\nFrom: <msnmsgr:{ME}>\r\n"
           f"Via: MSNSLP/1.0/TLP ;branch={{11111111-2222-3333-4444-555555555555}}\r\nCSeq: 0\r\n"
           f"Call-ID: {CALL_ID}\r\nMax-Forwards: 0\r\nContent-Type: application/x-msnmsgr-transreqbody\r\n"
           f"Content-Length: {len(body)}\r\n\r\n{body}").encode() + b"\x00"
    out = s.data_received(True, p2p_msg(50, P2PHeader(0, 3, 0, len(slp), len(slp), 0), slp, 0))
    assert sends(out, False) == b""
    (decline,) = CommandDecoder().feed(sends(out, True))
    assert decline.args[0] == PEER and b"MSNSLP/1.0 603 Decline" in decline.payload
    assert CALL_ID.encode() in decline.payload and records(out, "msnslp_direct_refused")


def test_uum_message_to_yahoo_contact_checked():
    """MSNP14 UUM (a message to a Yahoo! contact through the NS) goes to policy; blocked, it is dropped."""
    checker = Checker(block=("secret",))
    s = MsnpSession(checker, None, CTX)
    payload = b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=UTF-8\r\n\r\nthe secret"
    out = s.data_received(True, format_command("UUM", "12", "bob@yahoo.com", "32", "1", payload=payload))
    assert sends(out, False) == b"" and checker.calls[0][1].recipients == ("bob@yahoo.com",)
    assert b"was blocked" in sends(out, True)


def test_non_data_p2p_message_of_a_file_session_crosses():
    """A control message (flags 0x40, no data) with the file's SessionID is not file data: it crosses."""
    s, _, _ = outbound_slp_session()
    msg = p2p_msg(60, P2PHeader(SID, 5, 0, 0, 0, 0x40), b"", 2)
    assert sends(s.data_received(True, msg), False) == msg


@pytest.mark.parametrize("extra,closes", [(0, False), (1, True)])
def test_payload_limit_edge(extra, closes):
    """msnp_max_payload: a payload of exactly the limit is framed, one byte more closes."""
    limits = MsnpLimits(msnp_max_payload=500)
    s = MsnpSession(Checker(), None, CTX, limits)
    out = s.data_received(False, format_command("MSG", "Hotmail", "Hotmail", payload=b"x" * (500 + extra)))
    assert any(isinstance(c, Close) for c in out) == closes


def test_anomalies_per_kind_bounded():
    """msnp_max_anomalies_per_kind: a client repeating a malformed P2P message floods nothing."""
    s = switchboard(limits=MsnpLimits(msnp_max_anomalies_per_kind=3))
    payload = b"MIME-Version: 1.0\r\nContent-Type: application/x-msnmsgrp2p\r\nP2P-Dest: x\r\n\r\nshort"
    out = run(s, [(True, format_command("MSG", str(i), "U", payload=payload)) for i in range(10)])
    assert anomalies(out) == ["p2p_truncated"] * 3


def test_mid_session_switchboard_learns_people():
    """msnms_sb0 starts mid-conversation (no ANS/IRO): our passport comes from our client's typing notices
    (the peer said nothing before our message, so its recipient is still unknown there)."""
    checker = Checker()
    s = MsnpSession(checker, None, CTX)
    run(s, transcript("msnms_sb0.json"))
    ((text, ctx),) = checker.calls
    assert text.startswith("ouai mai tu voi je lui parl\u00e9") and ctx.sender == ME and ctx.recipients == ()
    s.data_received(False, inbound_msg("coucou"))
    assert s.participants == {PEER: "choupi"}


def test_offline_replay_of_the_capture():
    """The real capture through the offline replay (imguard pcap's driver): 34 messages with passports."""
    from imguard.replay.pcapfile import Capture
    from imguard.replay.replay import Replay, ReplaySettings
    from tests.test_irc_support import capture

    class Pipeline:
        def check_message(self, text, ctx):
            return Decision(action=BLOCK if "tania" in text else ALLOW)

        def check_file(self, data, ctx, name="", claimed_mime="", truncated=False):
            return FileReport(name, name, len(data)), ALLOWED

        def record(self, event):
            pass

        def with_direction(self, ctx):
            return ctx

    r = Replay(Pipeline(), ReplaySettings(ports=["1863=msnp"]),
               factories={"msnp": lambda q: MsnpSession(checker=q.checker, transfers=q.transfers, context=q.context)})
    summary = r.run(Capture.open(capture("ndpi/msnms.pcap")))
    messages = [(m.sender, tuple(m.recipients), m.text) for m in summary.messages]
    assert len(messages) == 34 and not summary.anomalies
    assert (PEER, (ME,), "je te comprend") in messages
    assert (ME, (PEER,), "tien jyce est au tel avec damien") in messages
    assert all(m.protocol == "msnp" for m in summary.messages)
    assert [m.action for m in summary.messages].count(BLOCK) == sum("tania" in m[2] for m in messages) == 2


def test_legacy_limits_share_one_parser():
    """MsnpLimits, OscarLimits and YmsgLimits have unique, prefixed names: one CLI parser takes all three."""
    import argparse
    import dataclasses

    from imguard.protocols.oscar import OscarLimits
    from imguard.protocols.ymsg import YmsgLimits
    from imguard.settings import add_arguments, from_arguments

    parser = argparse.ArgumentParser()
    for cls in (MsnpLimits, OscarLimits, YmsgLimits):
        add_arguments(parser, cls)
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls))
    args = parser.parse_args(["--msnp-max-payload", "100", "--oscar-max-frame-size", "200", "--ymsg-max-packet", "300"])
    assert from_arguments(MsnpLimits, args).msnp_max_payload == 100
    assert from_arguments(OscarLimits, args).oscar_max_frame_size == 200
    assert from_arguments(YmsgLimits, args).ymsg_max_packet == 300


def test_notification_server_login_identity():
    """An MSNP8 NS login (VER/CVR/USR TWN): the client's USR names the passport, the server's USR OK confirms it."""
    s = MsnpSession(Checker(), None, CTX.with_(server_address="207.46.104.20:1863"))
    items = [(True, b"VER 1 MSNP8 CVR0\r\n"), (False, b"VER 1 MSNP8 CVR0\r\n"),
             (True, b"CVR 2 0x0409 win 4.10 i386 MSNMSGR 5.0.0544 MSMSGS jujurius@msn.com\r\n"),
             (False, b"CVR 2 6.0.0602 6.0.0602 1.0.0000 http://download.microsoft.com/ http://messenger.msn.com\r\n"),
             (True, b"USR 3 TWN I jujurius@msn.com\r\n"),
             (False, b"USR 3 TWN S lc=1033,id=507,tw=40,fs=1,ru=http%3A%2F%2Fmessenger%2Emsn%2Ecom\r\n"),
             (True, b"USR 4 TWN S t=53*1hAu8ADuD3TEwdXoOMi08sD*2!cMrntTwVMTjoB3p6stWTqzbkKZPVQzA5NOt19SLI60PY!b8K4YhC!"
                    b"Ooo&p=5d\r\n"),
             (False, b"USR 4 OK jujurius@msn.com July(6) 1 0\r\n"),
             (False, b"MSG Hotmail Hotmail 20\r\nMIME-Version: 1.0\r\n\r\n")]
    out = run(s, items)
    assert s.passport == ME and s.confirmed
    assert sends(out, False) == b"".join(d for fc, d in items if fc)
    assert sends(out, True) == b"".join(d for fc, d in items if not fc)
    assert [e["imguard"]["msnp"]["friendly"] for e in records(out, "msnp_logged_in")] == ["July(6)"]


def test_msnslp_chunk_boundaries():
    """The in-band transfer's client bytes split at every 97th offset: the same file is held and inspected."""
    s0, _, items = outbound_slp_session()
    msgs = [p2p_msg(300 + i, h, c, 2) for i, (h, c) in enumerate(data_chunks(FILE))]
    client = b"".join(d for fc, d in items if fc) + b"".join(msgs)
    server = b"".join(d for fc, d in items if not fc)
    for cut in range(1, len(client), 97):
        s = switchboard()
        out = run(s, [(True, client[:cut]), (False, server), (True, client[cut:])])
        assert [i.data for i in inspects(out)] == [FILE], cut
        assert sends(out, False) == b"".join(d for fc, d in items if fc)


# --- the gateway's side relay: MSNFTP addresses rewritten ---------------------------------------------------

class Relay:
    """A side relay as the gateway's (imguard.gateway.dcc.SideRelayPorts + irc DccRelay): host, allocate."""

    def __init__(self, host="192.0.2.1", ports=(20000, 20001), fail=False):
        self.host, self.ports, self.fail, self.given = host, list(ports), fail, []

    def allocate(self, offer):
        if self.fail or not self.ports:
            raise RuntimeError("all relay ports have an offer waiting")
        self.given.append(offer)
        return self.ports.pop(0)


def accept_with_internal(ip: str, port: int) -> bytes:
    return invite_msg(101, f"Invitation-Command: ACCEPT\r\nInvitation-Cookie: 3141\r\nIP-Address: {ip}\r\n"
                           f"IP-Address-Internal: 10.1.1.1\r\nPort: {port}\r\nPortX: 11178\r\nAuthCookie: 9911\r\n"
                           "Launch-Application: FALSE\r\nRequest-Data: IP-Address:\r\n\r\n")


def test_msnftp_accept_rewritten_to_the_side_relay():
    """With a side relay the ACCEPT that crosses names only the relay (IP-Address/Port; the Internal and PortX
    variants removed, the length fixed); the offer waits under the relay key and knows the real listener."""
    from imguard.protocols.msnp import find_msnftp_offer, parse_invitation

    transfers, relay = ExpectedTransfers(), Relay()
    s = MsnpSession(Checker(), transfers, CTX, side_relay=relay)
    run(s, [(True, f"ANS 89 {ME} 1115371039.15845 17069658\r\n".encode()),
            (False, f"IRO 89 1 1 {PEER} choupi\r\n".encode()), (False, b"ANS 89 OK\r\n")])
    items = msnftp_invitation("report.exe", len(FILE), "203.0.113.7", 6891)[:2] + [
        (True, accept_with_internal("203.0.113.7", 6891))]
    out = run(s, items)
    cmd = CommandDecoder().feed(sends(out, False))[-1]
    body = cmd.payload.split(b"\r\n\r\n", 1)[1]
    assert parse_invitation(body).addresses == (("192.0.2.1", 20000),)
    assert b"Internal" not in body and b"PortX" not in body and b"AuthCookie: 9911" in body
    assert int(cmd.args[-1]) == len(cmd.payload)
    offer = find_msnftp_offer(transfers, "192.0.2.1", 20000)
    assert offer.real_address == ("203.0.113.7", 6891) and offer.listener_is_sender and offer.outbound
    assert find_msnftp_offer(transfers, "203.0.113.7", 6891) is None         # only the relay's address waits
    # Both parties behind the gateway: the other one's session sees the relay address and passes it on unchanged.
    other = MsnpSession(Checker(), transfers, CTX.with_(connection_id="sb9"), side_relay=relay)
    run(other, [(True, f"ANS 7 {PEER} 1 2\r\n".encode()), (False, f"IRO 7 1 1 {ME} me\r\n".encode()),
                (False, b"ANS 7 OK\r\n")])
    run(other, [(False, items[0][1].replace(b"MSG 100 N", f"MSG {ME} me".encode()))])
    relayed = cmd.raw.replace(b"MSG 101 N", f"MSG {ME} me".encode())
    assert sends(run(other, [(False, relayed)]), True) == relayed
    assert len(relay.given) == 1


def test_msnftp_accept_refused_when_no_relay_port():
    """No free relay port: the ACCEPT is not passed on (the file would go around the gateway); our client is told."""
    transfers = ExpectedTransfers()
    s = MsnpSession(Checker(), transfers, CTX, side_relay=Relay(fail=True))
    run(s, [(True, f"ANS 89 {ME} 1115371039.15845 17069658\r\n".encode()),
            (False, f"IRO 89 1 1 {PEER} choupi\r\n".encode()), (False, b"ANS 89 OK\r\n")])
    out = run(s, msnftp_invitation("report.exe", len(FILE), "203.0.113.7", 6891))
    assert b"6891" not in sends(out, False)
    assert b"could not be relayed" in sends(out, True)
    assert "msnftp_relay_failed" in anomalies(out)


def test_msnftp_accept_for_an_unseen_invitation_is_not_passed_around_the_relay():
    """With a side relay an ACCEPT whose INVITE this connection never saw cannot be attributed nor rewritten: it
    is dropped (anomaly, notice), never passed on with the listener's real address."""
    s = MsnpSession(Checker(), ExpectedTransfers(), CTX, side_relay=Relay())
    run(s, [(True, f"ANS 89 {ME} 1115371039.15845 17069658\r\n".encode()),
            (False, f"IRO 89 1 1 {PEER} choupi\r\n".encode()), (False, b"ANS 89 OK\r\n")])
    out = run(s, [(True, accept_with_internal("203.0.113.7", 6891))])
    assert sends(out, False) == b"" and b"was not passed on" in sends(out, True)
    assert "msnftp_unknown_cookie" in anomalies(out)
