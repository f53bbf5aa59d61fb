"""MsrpSession and its framing as transcripts: MSRP chunks in, commands out."""

from __future__ import annotations

import hashlib
import random

import pytest

from imguard.files.expected import ExpectedTransfers
from imguard.model import ChatContext, Decision, FileReport
from imguard.protocols.base import Close, Notify, Send
from imguard.protocols.msrp.framing import MsrpDecoder, MsrpFramingError, MsrpLimits, parse_byte_range
from imguard.protocols.msrp.offer import MsrpOffer, find_msrp_offer, parse_msrp_uri, path_key
from imguard.protocols.msrp.session import MsrpSession
from imguard.protocols.sip.session import SipSession
from tests.test_sip_support import (ALLOWED, BLOCKED, FROM_PATH, TO_PATH, Checker, anomalies, chunk, file_chunks,
                                    inspects, load, parse_msrp, records, report, response, sends)

CTX = ChatContext(client_address="10.0.0.7:40000", server_address="10.0.0.9:8888", connection_id="m1")
FILE = hashlib.sha256(b"seed").digest() * 300          # 9600 bytes


def negotiated(checker=None):
    """A SIP session that saw the RFC 5547 offer/answer, the table, and the MSRP offer the carrier would find."""
    transfers = ExpectedTransfers()
    sip = SipSession(checker or Checker(), transfers, ChatContext(connection_id="s1"))
    sip.data_received(True, load("rfc5547_invite.sip"))
    sip.data_received(False, load("rfc5547_200ok.sip"))
    return transfers, find_msrp_offer(transfers, "bobpc.example.com", 8888)


def make(checker=None, limits=MsrpLimits(), with_offer=True):
    checker = checker or Checker()
    transfers, offer = negotiated(checker)
    return MsrpSession(checker, transfers, CTX, offer if with_offer else None, limits), checker


def feed_all(s, items, from_client=True) -> list:
    out = []
    for item in items:
        out += s.data_received(from_client, item)
    return out


# --- framing ----------------------------------------------------------------------------------------

def test_rfc4975_send_frames_at_every_split():
    """RFC 4975 §7.3's SEND, split at every byte: one chunk, same raw bytes, body delimited by the end line."""
    raw = load("rfc4975_send.msrp")
    for cut in range(1, len(raw)):
        d = MsrpDecoder()
        [c] = d.feed(raw[:cut]) + d.feed(raw[cut:])
        assert c.raw == raw and c.body == b"Hey Bob, are you there?" and c.flag == "$", cut
        assert (c.tid, c.method, c.message_id, c.content_type) == ("a786hjs2", "SEND", "87652491", "text/plain")


def test_framing_of_responses_bodyless_and_tricky_bodies():
    d = MsrpDecoder()
    body = b"line\r\n-------other$\r\n-------a786hjs2X\r\nend"      # end-line look-alikes inside the body
    items = d.feed(response("a786hjs2") + chunk("a786hjs2", None) + chunk("a786hjs2", body) + chunk("abcd", b""))
    assert [(c.status, c.method, c.body) for c in items] == [(200, "", None), (0, "SEND", None), (0, "SEND", body),
                                                             (0, "SEND", b"")]
    assert items[0].comment == "OK"


def test_byte_range_parsing():
    assert parse_byte_range("1-25/25").total == 25 and parse_byte_range("1-*/*").end is None
    assert parse_byte_range("0-1/1") is None and parse_byte_range("5-2/9") is None and parse_byte_range("x") is None


def test_uris_and_keys():
    u = parse_msrp_uri("msrps://Bob.Example.com:2855/AbC;tcp")
    assert (u.scheme, u.host, u.port, u.session_id) == ("msrps", "bob.example.com", 2855, "AbC")
    assert path_key("msrp://[2001:db8::1]:9/x;tcp") == "2001:db8::1:9/x"
    assert parse_msrp_uri("msrp://h/x;tcp") is None and parse_msrp_uri("sip:a@b") is None


# --- text -------------------------------------------------------------------------------------------

def test_text_allowed_crosses_byte_exact_with_context():
    """A text SEND is checked (protocol msrp; sender/recipient and conversation from the SIP offer) and crosses as
    it came; the receiver's 200 goes back to the sender untouched."""
    s, checker = make()
    raw = chunk("tx1", b"Hey Bob, are you there?")
    assert s.data_received(True, raw) == [Send(False, raw)]
    [(text, ctx)] = checker.calls
    assert text == "Hey Bob, are you there?"
    assert (ctx.protocol, ctx.sender, ctx.recipients, ctx.conversation) == (
        "msrp", "sip:alice@example.com", ("sip:bob@example.com",), "a84b4c76e66710")
    assert s.data_received(False, response("tx1")) == [Send(True, response("tx1"))]


def test_text_from_the_other_side_has_the_other_sender():
    s, checker = make()
    s.data_received(False, chunk("rx1", b"yes", to_path=FROM_PATH, from_path=TO_PATH, message_id="b1"))
    assert (checker.calls[0][1].sender, checker.calls[0][1].recipients) == ("sip:bob@example.com",
                                                                            ("sip:alice@example.com",))


def test_origin_follows_who_the_gateways_user_is():
    """The SIP offer came from the gateway's own user (alice, its client): what she sends is from the inside, what
    bob sends her from the outside, whichever side opened the MSRP connection. Without an offer nobody knows."""
    s, checker = make()
    s.data_received(True, chunk("tx1", b"hi bob"))
    s.data_received(False, chunk("rx1", b"hi alice", to_path=FROM_PATH, from_path=TO_PATH, message_id="b1"))
    assert [(ctx.sender, ctx.origin) for _, ctx in checker.calls] == [("sip:alice@example.com", "client"),
                                                                      ("sip:bob@example.com", "server")]
    checker = Checker()
    MsrpSession(checker, ExpectedTransfers(), CTX, None).data_received(True, chunk("tx1", b"hi bob"))
    assert checker.calls[0][1].origin == ""


def test_rfc4975_example_with_its_inconsistent_byte_range():
    """RFC 4975's own example says 1-25/25 for 23 bytes: recorded as an anomaly, the message still goes (the end
    line is what delimits the body)."""
    s, checker = make(with_offer=False)
    raw = load("rfc4975_send.msrp")
    out = s.data_received(True, raw)
    assert anomalies(out) == ["msrp_byte_range_mismatch"] and sends(out, False) == raw
    ctx = checker.calls[0][1]
    assert (ctx.sender, ctx.recipients) == ("msrp://atlanta.example.com:7654/jshA7weztas;tcp",
                                            ("msrp://biloxi.example.com:12763/kjhd37s2s20w2a;tcp",))


def test_text_masked_gets_one_chunk_with_the_right_byte_range():
    s, _ = make(Checker(mask={"hunter2": "*******"}))
    [send] = s.data_received(True, chunk("tx1", b"pw hunter2 ok"))
    [c] = parse_msrp(send.data)
    assert (c.tid, c.body, c.get("byte-range"), c.flag) == ("tx1", b"pw ******* ok", "1-13/13", "$")


def test_text_blocked_answers_403_and_notices_the_sender():
    """Block: nothing reaches the receiver; the sender gets `403` on the transaction and an MSRP notice SEND whose
    200 is swallowed."""
    s, _ = make(Checker(block=("secret",)))
    out = s.data_received(True, chunk("tx1", b"the secret plan"))
    assert sends(out, False) == b""
    resp, notice = parse_msrp(sends(out, True))
    assert (resp.tid, resp.status, resp.comment) == ("tx1", 403, "Action-not-allowed")
    assert resp.to_path == [FROM_PATH] and resp.from_path == [TO_PATH]
    assert notice.method == "SEND" and notice.to_path == [FROM_PATH] and notice.from_path == [TO_PATH]
    assert notice.body == b"Your message to sip:bob@example.com was blocked by imguard: no secret"
    assert s.data_received(True, response(notice.tid, to_path=TO_PATH, from_path=FROM_PATH)) == []


def test_chunked_text_is_reassembled_before_policy():
    """A text in three chunks (out of order): held (the first two answered by us), checked whole, then released in
    byte order; the receiver's 200s to the chunks we answered are swallowed, the last one's goes through."""
    s, checker = make()
    text = b"one two three four five six"
    parts = [(1, text[:9]), (10, text[9:19]), (20, text[19:])]
    raws = {start: chunk(f"c{start:03d}", body, start=start, total=len(text), flag="$" if start == 20 else "+")
            for start, body in parts}
    out = s.data_received(True, raws[10]) + s.data_received(True, raws[20])
    assert sends(out, False) == b"" and [c.status for c in parse_msrp(sends(out, True))] == [200, 200]
    assert s.holds.in_flight == 1 and s.holds.held_bytes > 0
    out = s.data_received(True, raws[1])
    assert checker.calls[0][0] == text.decode()
    assert sends(out, False) == raws[1] + raws[10] + raws[20]
    assert not inspects(out) and s.holds.held_bytes == 0 and s.holds.in_flight == 0
    assert s.data_received(False, response("c010")) == [] and s.data_received(False, response("c020")) == []
    assert s.data_received(False, response("c001")) == [Send(True, response("c001"))]


def test_cpim_wrapped_text_is_checked_inside():
    s, checker = make(Checker(mask={"hunter2": "*******"}))
    cpim = (b"From: <sip:alice@example.com>\r\nTo: <sip:bob@example.com>\r\n\r\n"
            b"Content-Type: text/plain\r\n\r\nthe pw is hunter2")
    [send] = s.data_received(True, chunk("tx1", cpim, content_type="message/cpim"))
    assert checker.calls[0][0] == "the pw is hunter2"
    [c] = parse_msrp(send.data)
    assert c.body == cpim.replace(b"hunter2", b"*******") and c.get("byte-range") == f"1-{len(cpim)}/{len(cpim)}"


def test_composing_and_bodyless_sends_cross_at_once():
    s, checker = make()
    empty = chunk("e1", None)
    composing = chunk("i1", b"<isComposing/>", content_type="application/im-iscomposing+xml")
    assert s.data_received(True, empty + composing) == [Send(False, empty + composing)]
    assert not checker.calls


def test_unknown_methods_and_bodies_outside_send_are_dropped():
    """Only SEND bodies are checked, so a body in another request, or an unknown method, must NOT cross: 400 / 501."""
    s, checker = make()
    odd = chunk("x001", b"the secret").replace(b" SEND\r\n", b" SENT\r\n", 1)
    out = s.data_received(True, odd)
    assert sends(out, False) == b"" and anomalies(out) == ["msrp_unknown_method"]
    assert [c.status for c in parse_msrp(sends(out, True))] == [501]
    rep = chunk("x002", b"the secret").replace(b" SEND\r\n", b" REPORT\r\n", 1)
    out = s.data_received(True, rep)
    assert sends(out, False) == b"" and anomalies(out) == ["msrp_unexpected_body"] and not checker.calls


def test_reports_and_unknown_responses_cross():
    s, _ = make()
    rep = (f"MSRP r1 REPORT\r\nTo-Path: {FROM_PATH}\r\nFrom-Path: {TO_PATH}\r\nMessage-ID: x\r\n"
           f"Byte-Range: 1-3/3\r\nStatus: 000 200 OK\r\n-------r1$\r\n").encode()
    assert s.data_received(False, rep) == [Send(True, rep)]
    assert s.data_received(False, response("zzzz")) == [Send(True, response("zzzz"))]


# --- files ------------------------------------------------------------------------------------------

def test_file_chunks_held_then_released_byte_identical():
    """RFC 5547 push: 10 chunks sent out of order are held (each answered 200 by us), InspectFile carries the whole
    file with the SDP name and type; on allow every chunk goes to the receiver in byte order, byte for byte, and
    the receiver's 200s stop at the gateway."""
    s, _ = make()
    chunks = file_chunks(FILE, 1000)
    random.Random(7).shuffle(chunks)
    out = feed_all(s, [raw for _, raw in chunks])
    assert sends(out, False) == b""
    answers = parse_msrp(sends(out, True))
    assert sorted(a.tid for a in answers) == sorted(f"t{i:04d}" for i in range(10))
    assert all(a.status == 200 for a in answers)
    [job] = inspects(out)
    assert job.data == FILE and not job.truncated
    assert (job.name, job.claimed_mime, job.context.transfer_mechanism, job.context.sender) == (
        "My cool picture.jpg", "image/jpeg", "msrp", "sip:alice@example.com")
    assert s.holds.held_bytes > len(FILE) and s.holds.in_flight == 1
    out = s.file_verdict(job.transfer_id, report(job), ALLOWED)
    assert sends(out, False) == b"".join(raw for _, raw in sorted(chunks))
    assert s.holds.held_bytes == 0 and s.holds.in_flight == 0
    for i in range(10):
        assert s.data_received(False, response(f"t{i:04d}")) == []


def test_overlapping_byte_ranges_with_different_content_are_blocked():
    """Evasion: chunk 2's Byte-Range overlaps chunk 1 with other bytes (EICAR's head over a harmless one). What a
    receiver assembles would not be what was inspected: the file is cut (msrp_overlap), never inspected as clean,
    and the receiver gets not a byte. An overlap with the same bytes (a re-chunked resend) is fine."""
    BIN = "application/octet-stream"
    s, _ = make()
    first, second = b"harmless-text-0123456789", b"X5O!P%@AP[4\\PZX54(P^)7CC)"
    out = feed_all(s, [chunk("o1", first, start=1, total=40, flag="+", message_id="ov", content_type=BIN),
                       chunk("o2", second, start=5, total=40, flag="+", message_id="ov", content_type=BIN),
                       chunk("o3", b"z" * 10, start=31, total=40, message_id="ov", content_type=BIN)])
    assert "msrp_overlap" in anomalies(out) and not inspects(out)
    assert sends(out, False) == b""
    s, _ = make()
    data = bytes(range(40))
    out = feed_all(s, [chunk("o1", data[:20], start=1, total=40, flag="+", message_id="ok", content_type=BIN),
                       chunk("o2", data[10:30], start=11, total=40, flag="+", message_id="ok", content_type=BIN),
                       chunk("o3", data[30:], start=31, total=40, message_id="ok", content_type=BIN)])
    [job] = inspects(out)
    assert job.data == data and not anomalies(out)


def test_file_blocked_receiver_gets_nothing_sender_gets_report_and_notice():
    """Block: not a byte to the receiver; the sender gets a REPORT (000 403) and a notice (the tracker's text for a
    blocked file: its name, who sent it to whom, the rule); a Notify names the SIP connection of the offer (s1)."""
    s, _ = make()
    out = feed_all(s, [raw for _, raw in file_chunks(FILE, 4000, message_id="evil")])
    [job] = inspects(out)
    out = s.file_verdict(job.transfer_id, report(job), BLOCKED)
    assert sends(out, False) == b""
    rep, notice = parse_msrp(sends(out, True))
    assert rep.method == "REPORT" and rep.get("status") == "000 403 Action-not-allowed"
    assert rep.message_id == "evil" and rep.get("byte-range") == f"1-{len(FILE)}/{len(FILE)}"
    assert notice.body == (b"imguard: the file 'My cool picture.jpg' from sip:alice@example.com to sip:bob@example.com "
                           b"was blocked (no programs)")
    [note] = [c for c in out if isinstance(c, Notify)]
    assert (note.connection_id, note.protocol, note.text) == ("s1", "sip", notice.body.decode())
    ev = note.event()
    assert ev["imguard"]["notify"]["connection_id"] == "s1" and ev["imguard"]["msrp"]["message_id"] == "evil"
    assert ev["imguard"]["decision"]["action"] == "block"
    assert s.file_verdict(job.transfer_id, report(job), ALLOWED) == []


def inbound_file_chunks(data: bytes, message_id: str) -> list[bytes]:
    """Bob's chunks of a file to alice (the gateway's user): To-Path alice's, From-Path bob's."""
    return [raw.replace(f"To-Path: {TO_PATH}".encode(), f"To-Path: {FROM_PATH}".encode())
            .replace(f"From-Path: {FROM_PATH}".encode(), f"From-Path: {TO_PATH}".encode())
            for _, raw in file_chunks(data, 4000, message_id=message_id)]


def test_inbound_file_blocked_receiver_told_in_its_own_words():
    """A file bob (the other party) sends to alice, whose SIP offer it was: decided inbound (origin server, sender
    bob, recipient alice). Blocked: alice gets no byte of it, only an MSRP notice in her own words; bob gets the
    REPORT and the tracker's notice; the Notify for alice's SIP connection says what she was told."""
    s, _ = make()
    out = feed_all(s, inbound_file_chunks(FILE, "in1"), from_client=False)
    assert sends(out, True) == b""
    [job] = inspects(out)
    assert (job.context.origin, job.context.sender, job.context.recipients) == (
        "server", "sip:bob@example.com", ("sip:alice@example.com",))
    out = s.file_verdict(job.transfer_id, report(job), Decision(action="block", matches=BLOCKED.matches,
                                                                notice="Your file was blocked: malware."))
    [told] = parse_msrp(sends(out, True))
    assert told.method == "SEND" and told.to_path == [FROM_PATH] and told.from_path == [TO_PATH]
    assert told.body == b"imguard: the file 'My cool picture.jpg' from sip:bob@example.com was blocked (no programs)"
    assert FILE[:64] not in sends(out, True)
    rep, notice = parse_msrp(sends(out, False))
    assert rep.method == "REPORT" and rep.get("status") == "000 403 Action-not-allowed"
    assert notice.body == b"Your file was blocked: malware."
    [note] = [c for c in out if isinstance(c, Notify)]
    assert (note.connection_id, note.text) == ("s1", told.body.decode())
    assert s.holds.held_bytes == 0 and s.holds.in_flight == 0


def test_inbound_file_allowed_reaches_our_user_byte_exact_and_tells_nobody():
    s, _ = make()
    chunks = inbound_file_chunks(FILE, "in2")
    [job] = inspects(feed_all(s, chunks, from_client=False))
    out = s.file_verdict(job.transfer_id, report(job), Decision(action="allow", notice="scanned by imguard"))
    assert sends(out, True) == b"".join(chunks) and sends(out, False) == b""
    assert not [c for c in out if isinstance(c, Notify)]


def test_inbound_text_blocked_tells_both():
    """A text bob sends alice, blocked: bob gets the 403 and his notice, alice an MSRP notice naming bob."""
    s, _ = make(Checker(block=("secret",)))
    out = s.data_received(False, chunk("rx1", b"the secret plan", to_path=FROM_PATH, from_path=TO_PATH,
                                       message_id="b1"))
    told = parse_msrp(sends(out, True))
    assert [c.body for c in told] == [b"A message from sip:bob@example.com was blocked by imguard: no secret"]
    resp, notice = parse_msrp(sends(out, False))
    assert resp.status == 403 and notice.body.startswith(b"Your message to sip:alice@example.com was blocked")


def test_cpim_wrapped_file_is_unwrapped_for_inspection():
    s, _ = make()
    cpim = (b"From: <sip:alice@example.com>\r\nTo: <sip:bob@example.com>\r\n\r\n"
            b"Content-Disposition: render; filename=\"My cool picture.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n" + FILE)
    out = feed_all(s, [raw for _, raw in file_chunks(cpim, 3000, content_type="message/cpim")])
    [job] = inspects(out)
    assert job.data == FILE and job.claimed_mime == "image/jpeg"


def test_aborted_message_is_dropped():
    """`#` aborts: the held chunks are dropped, the receiver never sees any of it, an event says so."""
    s, _ = make()
    chunks = file_chunks(FILE, 2000)
    out = feed_all(s, [raw for _, raw in chunks[:2]])
    aborted = chunk("ab01", FILE[4000:4100], start=4001, total=len(FILE), flag="#", message_id="f1",
                    content_type="application/octet-stream")
    out += s.data_received(True, aborted)
    assert sends(out, False) == b"" and not inspects(out) and records(out, "msrp_aborted")
    assert not anomalies(out)                           # an abort is the sender's right: an event, not an anomaly
    assert s.holds.held_bytes == 0 and s.holds.in_flight == 0


def test_gap_at_close_is_inspected_as_truncated():
    """The sender closes with a chunk missing: what arrived is inspected, marked truncated."""
    s, _ = make()
    chunks = file_chunks(FILE, 2000)
    out = feed_all(s, [raw for i, (_, raw) in enumerate(chunks) if i != 2])
    assert not inspects(out)
    [job] = inspects(s.connection_closed(True))
    assert job.truncated and job.data == FILE[:4000]


def test_text_incomplete_at_close_is_dropped():
    s, _ = make()
    s.data_received(True, chunk("c1", b"half a sen", total=30, flag="+"))
    out = s.connection_closed(True)
    assert anomalies(out) == ["msrp_incomplete_message"] and sends(out, False) == b""


def test_receiver_gone_before_the_verdict_gets_nothing():
    """The receiver closes while the file is out for inspection: an allow delivers nothing and says so."""
    s, _ = make()
    [job] = inspects(feed_all(s, [raw for _, raw in file_chunks(FILE, 4000)]))
    assert s.connection_closed(False) == []
    out = s.file_verdict(job.transfer_id, report(job), ALLOWED)
    assert sends(out, False) == b"" and anomalies(out) == ["msrp_receiver_gone"]
    assert s.holds.held_bytes == 0 and s.holds.in_flight == 0


def test_blocked_file_whose_sender_left_is_told_on_sip_only():
    """The sender closed after its file was whole: a block is not answered in-band (nobody is there), the Notify
    for its SIP connection still goes."""
    s, _ = make()
    [job] = inspects(feed_all(s, [raw for _, raw in file_chunks(FILE, 4000)]))
    s.connection_closed(True)
    out = s.file_verdict(job.transfer_id, report(job), BLOCKED)
    assert sends(out, True) == b"" and sends(out, False) == b""
    [note] = [c for c in out if isinstance(c, Notify)]
    assert note.connection_id == "s1" and "My cool picture.jpg" in note.text


def test_failure_report_no_and_partial_get_no_200():
    """Failure-Report: no / partial: the gateway sends no 200 for held chunks (RFC 4975 §7.1.2)."""
    s, _ = make()
    out = s.data_received(True, chunk("p1", FILE[:100], total=len(FILE), flag="+", message_id="f9",
                                      content_type="application/octet-stream", extra=[("Failure-Report", "no")]))
    out += s.data_received(True, chunk("p2", FILE[100:200], start=101, total=len(FILE), flag="+", message_id="f9",
                                       content_type="application/octet-stream",
                                       extra=[("Failure-Report", "partial")]))
    assert out == []


def test_offer_found_by_to_path_when_the_carrier_had_none():
    """No offer from the carrier (e.g. a relay or port 2855): the To-Path URI finds it in the table."""
    s, _ = make(with_offer=False)
    out = feed_all(s, [raw for _, raw in file_chunks(FILE, 5000)])
    [job] = inspects(out)
    assert job.name == "My cool picture.jpg" and job.context.sender == "sip:alice@example.com"


def test_non_text_in_a_chat_session_is_inspected_too():
    s = MsrpSession(Checker(), ExpectedTransfers(), CTX, None)
    out = s.data_received(True, chunk("i1", b"\xff\xd8\xff\xe0" + bytes(20), content_type="image/jpeg"))
    [job] = inspects(out)
    assert job.claimed_mime == "image/jpeg" and job.name == "" and sends(out, False) == b""
    assert [c.status for c in parse_msrp(sends(out, True))] == [200]


# --- bad input and limits ---------------------------------------------------------------------------

def test_byte_range_beyond_total_is_refused():
    s, _ = make()
    out = s.data_received(True, chunk("b1", b"x" * 50, start=80, total=100, flag="+", message_id="m",
                                      content_type="application/octet-stream"))
    assert anomalies(out) == ["msrp_byte_range_beyond_total"] and sends(out, False) == b""
    [resp] = parse_msrp(sends(out, True))
    assert resp.status == 423


@pytest.mark.parametrize("raw,kind", [
    (chunk("b1", b"x").replace(b"Byte-Range: 1-1/*", b"Byte-Range: banana"), "msrp_bad_byte_range"),
    (chunk("b1", b"x").replace(b"Message-ID: 12339sdqwer\r\n", b""), "msrp_bad_request"),
    (chunk("b1", b"x", flag="+").replace(b"Byte-Range: 1-1/*\r\n", b""), "msrp_bad_byte_range"),
])
def test_bad_chunks_are_dropped_with_400(raw, kind):
    s, _ = make()
    out = s.data_received(True, raw)
    assert anomalies(out) == [kind] and sends(out, False) == b""
    assert [c.status for c in parse_msrp(sends(out, True))] in ([400], [])


@pytest.mark.parametrize("raw,kind", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "msrp_bad_start_line"),
    (b"MSRP a$b SEND\r\n", "msrp_bad_start_line"),                      # '$' is not an ident character
    (b"MSRP abcd SEND\r\nno colon here\r\n", "msrp_bad_header"),
    (b"\x16\x03\x01\x00\x50" + bytes(80), "msrp_bad_start_line"),
])
def test_garbage_closes_with_an_anomaly(raw, kind):
    s, _ = make()
    out = s.data_received(True, raw)
    assert anomalies(out) == [kind] and isinstance(out[-1], Close) and sends(out, False) == b""
    assert s.data_received(True, chunk("tx1", b"hi")) == []


def test_missing_end_line_is_bounded_and_reported():
    """A chunk whose end line never comes: past msrp_max_chunk_size the connection closes; at close before that,
    an anomaly and nothing forwarded."""
    s, _ = make(limits=MsrpLimits(msrp_max_chunk_size=10_000))
    head = chunk("tx1", b"")[: -len(b"\r\n-------tx1$\r\n")]
    out = s.data_received(True, head + b"x" * 5000)
    assert out == []
    out = s.data_received(True, b"y" * 6000)
    assert anomalies(out) == ["msrp_chunk_too_large"] and isinstance(out[-1], Close)
    s, _ = make()
    s.data_received(True, head + b"partial")
    assert anomalies(s.connection_closed(True)) == ["msrp_incomplete_chunk"]


def test_held_bytes_limit_refuses_with_413_and_a_notice():
    """A file past msrp_max_held_bytes (announced total or actual) is refused: 413, a notice, an anomaly; its later
    chunks get 413 too; nothing reaches the receiver and nothing stays held."""
    s, _ = make(limits=MsrpLimits(msrp_max_held_bytes=5000))
    chunks = file_chunks(FILE, 1000)
    out = s.data_received(True, chunks[0][1])
    assert anomalies(out) == ["msrp_too_large"]
    resp, notice = parse_msrp(sends(out, True))
    assert resp.status == 413 and b"could not be inspected" in notice.body
    out = feed_all(s, [raw for _, raw in chunks[1:]])
    assert sends(out, False) == b"" and {c.status for c in parse_msrp(sends(out, True))} == {413}
    assert s.holds.held_bytes == 0 and s.holds.in_flight == 0 and not inspects(out)


def test_inbound_file_over_the_held_bytes_limit_tells_our_user_too():
    """Bob's file to alice past msrp_max_held_bytes: bob gets the 413 and the notice, alice (inside) the notice."""
    s, _ = make(limits=MsrpLimits(msrp_max_held_bytes=5000))
    out = s.data_received(False, inbound_file_chunks(FILE, "big")[0])
    [told] = parse_msrp(sends(out, True))
    assert told.method == "SEND" and b"could not be inspected" in told.body and told.to_path == [FROM_PATH]
    resp, notice = parse_msrp(sends(out, False))
    assert resp.status == 413 and notice.body == told.body


def test_a_message_within_the_held_bytes_limit_fits():
    """msrp_max_held_bytes bounds the chunks held, each counted once (its headers and body): a file a little
    smaller is held whole and inspected."""
    s, _ = make(limits=MsrpLimits(msrp_max_held_bytes=5000))
    out = feed_all(s, [raw for _, raw in file_chunks(FILE[:4000], 1000)])
    [job] = inspects(out)
    assert job.data == FILE[:4000] and not anomalies(out)
    assert {c.status for c in parse_msrp(sends(out, True))} == {200}


def test_too_many_messages_in_reassembly():
    s, _ = make(limits=MsrpLimits(msrp_max_messages_in_reassembly=2))
    out = []
    for i in range(3):
        out += s.data_received(True, chunk(f"m{i}xx", b"part", total=100, flag="+", message_id=f"id{i}",
                                           content_type="application/octet-stream"))
    assert anomalies(out) == ["msrp_too_many_messages"]
    assert [c.status for c in parse_msrp(sends(out, True))] == [200, 200, 413]


def test_swallow_table_is_bounded():
    s, _ = make(limits=MsrpLimits(msrp_max_tracked_transactions=3))
    out = feed_all(s, [raw for _, raw in file_chunks(FILE, 1000)])
    [job] = inspects(out)
    s.file_verdict(job.transfer_id, report(job), ALLOWED)
    assert len(s._swallow) == 3


def test_decoder_reports_the_error_after_what_it_framed():
    d = MsrpDecoder()
    good = chunk("tx1", b"hi")
    first, error = d.feed(good + b"NOT MSRP\r\n")
    assert first.raw == good and isinstance(error, MsrpFramingError)
    assert d.feed(good) == []


def test_offer_who_falls_back_to_paths():
    offer = MsrpOffer("o1", "c", "sip:a@x", "sip:b@y", offer_path=(FROM_PATH,))
    assert offer.who(FROM_PATH, "msrp://z:1/q;tcp") == ("sip:b@y", "sip:a@x")
    assert offer.who("msrp://k:1/q;tcp", FROM_PATH) == ("sip:a@x", "sip:b@y")
    assert offer.who("msrp://k:1/q;tcp", "msrp://z:1/q;tcp") == ("msrp://z:1/q;tcp", "msrp://k:1/q;tcp")


def test_chunk_boundaries_give_the_same_result():
    """A whole chunked file transfer fed in pieces of 1, 7, 100 and 4096 bytes: the same InspectFile data and the
    same answers."""
    stream = b"".join(raw for _, raw in file_chunks(FILE[:3000], 700))
    results = set()
    for size in (1, 7, 100, 4096):
        s, _ = make()
        out = feed_all(s, [stream[i:i + size] for i in range(0, len(stream), size)])
        [job] = inspects(out)
        results.add((job.data, sends(out, True)))
    assert len(results) == 1


def test_verdict_for_unknown_transfer_is_ignored():
    s, _ = make()
    assert s.file_verdict("nope", FileReport(name="", path="", size=0), Decision()) == []
    assert s.tls_started() == []


def test_receiver_failure_after_release_is_recorded():
    """The receiver refuses a chunk the gateway had already answered: swallowed, recorded as msrp_late_failure."""
    s, _ = make()
    out = feed_all(s, [raw for _, raw in file_chunks(FILE[:2000], 1000)])
    [job] = inspects(out)
    s.file_verdict(job.transfer_id, report(job), ALLOWED)
    assert s.data_received(False, response("t0000")) == []
    out = s.data_received(False, response("t0001", 413, "Stop-sending-message"))
    [ev] = records(out, "msrp_late_failure")
    assert sends(out, True) == b"" and ev["imguard"]["msrp"]["status"] == 413
