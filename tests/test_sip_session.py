"""SipSession and SipDatagramHandler as transcripts: SIP bytes in, commands out."""

from __future__ import annotations

import pytest

from imguard.files.expected import ExpectedTransfers
from imguard.model import ChatContext
from imguard.protocols.base import Close, InspectFile, Send
from imguard.protocols.msrp.offer import MSRP_KIND, find_msrp_offer, find_msrp_offer_by_uri
from imguard.protocols.sip.message import (KeepAlive, SipFramingError, SipLimits, SipStreamDecoder, parse_datagram,
                                           tag_of, uri_of)
from imguard.protocols.sip.sdp import msrp_media, parse_file_selector
from imguard.protocols.sip.session import SipDatagramHandler, SipSession
from tests.test_sip_support import (ALLOWED, BLOCKED, Checker, anomalies, inspects, load, message, records, report,
                                    sends, sip)

CTX = ChatContext(client_address="10.0.0.7:5099", server_address="10.0.0.22:5060", connection_id="s1")


def make(checker=None, limits=SipLimits(), transfers=None):
    transfers = transfers if transfers is not None else ExpectedTransfers()
    return SipSession(checker or Checker(), transfers, CTX, limits), transfers


def parse(data: bytes):
    [msg] = SipStreamDecoder().feed(data)
    return msg


# --- framing ----------------------------------------------------------------------------------------

def test_rfc3428_message_frames_byte_exact_at_every_split():
    """The RFC 3428 MESSAGE, fed split at every byte boundary, gives the same message with the same raw bytes."""
    raw = load("rfc3428_message.sip") + load("rfc3428_message.sip")
    for cut in range(1, len(raw)):
        d = SipStreamDecoder()
        msgs = d.feed(raw[:cut]) + d.feed(raw[cut:])
        assert [m.raw for m in msgs] == [load("rfc3428_message.sip")] * 2, cut
        assert msgs[0].body == b"Watson, come here." and msgs[0].method == "MESSAGE"


def test_session_output_is_the_same_at_every_split():
    """An allowed, a masked and a blocked MESSAGE in one stream, split at every byte: the same bytes to each side."""
    stream = message("hello", cseq=1) + message("pw hunter2", cseq=2) + message("the secret", cseq=3)
    results = set()
    for cut in range(1, len(stream)):
        s, _ = make(Checker(block=("secret",), mask={"hunter2": "*******"}))
        out = s.data_received(True, stream[:cut]) + s.data_received(True, stream[cut:])
        to_client = sends(out, True)
        results.add((sends(out, False), to_client.split(b";tag=")[0], to_client.count(b"SIP/2.0 403 Forbidden")))
    [(to_server, _, blocks)] = results
    assert to_server == message("hello", cseq=1) + message("pw *******", cseq=2) and blocks == 1


def test_compact_forms_and_folding():
    """`f:`, `t:`, `i:`, `l:`, `c:` are the long headers; a folded header is one value."""
    raw = (b"MESSAGE sip:bob@b.example SIP/2.0\r\nv: SIP/2.0/TCP h;branch=z9hG4bK1\r\n"
           b"f: <sip:alice@a.example>;tag=1\r\n"
           b"t: <sip:bob@b.example>\r\ni: abc\r\nCSeq: 7\r\n  MESSAGE\r\nc: text/plain\r\nl: 2\r\n\r\nhi")
    msg = parse(raw)
    assert (msg.call_id, msg.cseq, msg.content_type[0], msg.body) == ("abc", (7, "MESSAGE"), "text/plain", b"hi")
    assert uri_of(msg.get("from")) == "sip:alice@a.example" and msg.get_all("via") == ["SIP/2.0/TCP h;branch=z9hG4bK1"]


def test_keepalives_pass_through():
    """RFC 5626 CRLF keep-alives (ping \\r\\n\\r\\n, pong \\r\\n) cross as they are."""
    s, _ = make()
    out = s.data_received(True, b"\r\n\r\n")
    assert sends(out, False) == b"\r\n\r\n"
    assert sends(s.data_received(False, b"\r\n"), True) == b"\r\n"
    d = SipStreamDecoder()
    assert d.feed(b"\r") == [] and d.feed(b"\n\r\n") == [KeepAlive(b"\r\n\r\n")]


def test_uri_and_tag_helpers():
    assert uri_of('"Alice" <sip:alice@a.example;transport=tcp>;tag=9') == "sip:alice@a.example"
    assert uri_of("sip:bob@b.example;tag=1") == "sip:bob@b.example"
    assert tag_of("<sip:a@b>;tag=abc;x=1") == "abc" and tag_of("<sip:a@b;tag=no>") == ""


# --- MESSAGE policy ---------------------------------------------------------------------------------

def test_allowed_message_crosses_byte_exact():
    """RFC 3428's MESSAGE goes to policy (protocol sip, From as sender, To as recipient) and crosses unchanged."""
    checker = Checker()
    s, _ = make(checker)
    raw = load("rfc3428_message.sip")
    out = s.data_received(True, raw)
    assert out == [Send(to_client=False, data=raw)]
    [(text, ctx)] = checker.calls
    assert text == "Watson, come here."
    assert (ctx.protocol, ctx.sender, ctx.recipients, ctx.connection_id) == (
        "sip", "sip:user1@domain.com", ("sip:user2@domain.com",), "s1")


def test_p_asserted_identity_and_request_uri():
    """P-Asserted-Identity is the sender when present; a Request-URI differing from To is a recipient too."""
    checker = Checker()
    s, _ = make(checker)
    s.data_received(True, message("hi", extra=[("P-Asserted-Identity", '"A" <sip:alice.real@a.example>')],
                                  ruri="sip:bob@10.0.0.9:5060;transport=tcp"))
    ctx = checker.calls[0][1]
    assert ctx.sender == "sip:alice.real@a.example"
    assert ctx.recipients == ("sip:bob@b.example", "sip:bob@10.0.0.9:5060")


def test_mask_rewrites_body_and_content_length():
    """Mask: only the body changes; Content-Length is fixed; every other header line is kept byte for byte."""
    s, _ = make(Checker(mask={"4111111111111111": "****"}))
    raw = message("card 4111111111111111 ok")
    [send] = s.data_received(True, raw)
    msg = parse(send.data)
    assert msg.body == b"card **** ok" and msg.get("content-length") == "12"
    assert msg.header_lines[:-1] == parse(raw).header_lines[:-1]


def test_mask_with_a_notice_tells_the_user():
    """A mask whose rule has a notice: the masked MESSAGE goes on and the user gets the notice as a MESSAGE."""
    s, _ = make(Checker(mask={"hunter2": "*******"}, notice="passwords are masked"))
    out = s.data_received(True, message("pw hunter2", extra=[("Contact", "<sip:alice@10.0.0.7:5099>")]))
    assert parse(sends(out, False)).body == b"pw *******"
    assert parse(sends(out, True)).body == b"passwords are masked"


def test_mask_inside_cpim_keeps_the_wrapper():
    """message/cpim (RFC 3862): the inner text is checked and masked; the CPIM and MIME headers stay."""
    checker = Checker(mask={"hunter2": "*******"})
    s, _ = make(checker)
    cpim = (b"From: <sip:alice@a.example>\r\nTo: <sip:bob@b.example>\r\nDateTime: 2006-05-15T15:02:31-03:00\r\n\r\n"
            b"Content-Type: text/plain\r\n\r\nthe password is hunter2")
    [send] = s.data_received(True, message(cpim, content_type="message/cpim"))
    assert checker.calls[0][0] == "the password is hunter2"
    body = parse(send.data).body
    assert body == cpim.replace(b"hunter2", b"*******")
    assert parse(send.data).get("content-length") == str(len(body))


def test_html_is_stripped_for_policy_and_masked_as_plain_text():
    checker = Checker(mask={"hunter2": "*******"})
    s, _ = make(checker)
    [send] = s.data_received(True, message("<p>pw: <b>hunter2</b> &amp; more</p>", content_type="text/html"))
    assert checker.calls[0][0] == "pw: hunter2 & more"
    msg = parse(send.data)
    assert msg.content_type[0] == "text/plain" and msg.body == b"pw: ******* & more"


def test_block_answers_403_built_from_the_request():
    """Block: the MESSAGE must NOT reach the server; the sender gets 403 with every Via in order, From, To with a
    new tag, Call-ID, CSeq copied (RFC 3261 §8.2.6), a Warning 399 imguard header and the notice as body."""
    s, _ = make(Checker(block=("secret",)))
    raw = message("the secret plan", vias=3)
    out = s.data_received(True, raw)
    assert sends(out, False) == b""
    req, resp = parse(raw), parse(sends(out, True))
    assert (resp.status, resp.reason) == (403, "Forbidden")
    assert resp.get_all("via") == req.get_all("via")
    assert resp.get("from") == req.get("from") and resp.call_id == req.call_id and resp.get("cseq") == "1 MESSAGE"
    assert uri_of(resp.get("to")) == "sip:bob@b.example" and tag_of(resp.get("to"))
    assert resp.get("warning") == '399 imguard "Your message to sip:bob@b.example was blocked by imguard: no secret"'
    assert resp.body == b"Your message to sip:bob@b.example was blocked by imguard: no secret"
    assert resp.get("content-length") == str(len(resp.body))


def test_block_keeps_an_existing_to_tag_and_quotes_the_notice():
    s, _ = make(Checker(block=("x",), notice='say "no"\r\nInjected: 1'))
    out = s.data_received(True, message("x", to="<sip:bob@b.example>;tag=dialog7"))
    resp = parse(sends(out, True))
    assert resp.get("to") == "<sip:bob@b.example>;tag=dialog7"
    assert resp.get("warning") == '399 imguard "say \\"no\\" Injected: 1"' and resp.get("injected") == ""


REGISTER = sip("REGISTER sip:b.example SIP/2.0", [("Via", "SIP/2.0/TCP h;branch=z9hG4bK2"),
                                                  ("From", "<sip:alice@b.example>;tag=1"),
                                                  ("To", "<sip:alice@b.example>"),
                                                  ("Call-ID", "r1"), ("CSeq", "1 REGISTER"),
                                                  ("Contact", "<sip:alice@10.0.0.7:5099;transport=tcp>")])


def test_inbound_messages_are_decided_and_the_user_told():
    """A MESSAGE the proxy delivers to our user is decided too (origin server: inbound): allowed it crosses as it
    came; blocked, the outside sender gets the 403 and our user, who never sees the text, a notice MESSAGE in its
    own words (not the rule's notice, which is written for a sender). sip_check_inbound_messages off: unchecked."""
    checker = Checker(block=("secret",), notice="Your message was blocked: it names a secret.")
    s, _ = make(checker)
    s.data_received(True, REGISTER)
    hello = message("hello alice", frm="<sip:bob@b.example>", to="<sip:alice@b.example>", ruri="sip:alice@b.example")
    assert sends(s.data_received(False, hello), True) == hello
    assert [(c.sender, c.recipients, c.origin) for _, c in checker.calls] == [
        ("sip:bob@b.example", ("sip:alice@b.example",), "server")]
    raw = message("the secret", frm="<sip:bob@b.example>", to="<sip:alice@b.example>", ruri="sip:alice@b.example",
                  cseq=2)
    out = s.data_received(False, raw)
    refusal = parse(sends(out, False))
    assert refusal.status == 403 and refusal.call_id == "asd88asd77a-2@10.0.0.7"
    note = parse(sends(out, True))
    assert note.method == "MESSAGE" and note.request_uri == "sip:alice@10.0.0.7:5099"
    assert note.body == b"A message from sip:bob@b.example was blocked by imguard: no secret"
    assert b"the secret" not in sends(out, True)
    checker = Checker(block=("secret",))
    s, _ = make(checker, SipLimits(sip_check_inbound_messages=False))
    assert sends(s.data_received(False, raw), True) == raw and not checker.calls


def test_registered_user_cannot_be_renamed_by_from_or_a_second_register():
    """Attack transcript: once the registrar's 200 to alice's REGISTER confirmed her AOR, a MESSAGE whose From and
    P-Asserted-Identity claim the security team is still decided as alice's (sip_sender_mismatch), and a second
    REGISTER the registrar accepts for another AOR does not rename her (identity_change)."""
    checker = Checker()
    s, _ = make(checker)
    ok = sip("SIP/2.0 200 OK", [("Via", "SIP/2.0/TCP h;branch=z9hG4bK2"), ("Call-ID", "r1"), ("CSeq", "1 REGISTER")])
    s.data_received(True, REGISTER)
    s.data_received(False, ok)
    assert (s.user, s.registered) == ("sip:alice@b.example", True)
    out = s.data_received(True, message("hi", frm="<sip:security-team@b.example>",
                                        extra=[("P-Asserted-Identity", "<sip:security-team@b.example>")]))
    assert anomalies(out) == ["sip_sender_mismatch"] and checker.calls[-1][1].sender == "sip:alice@b.example"
    other = REGISTER.replace(b"sip:alice@b.example>", b"sip:security-team@b.example>").replace(b"r1", b"r2")
    s.data_received(True, other)
    out = s.data_received(False, ok.replace(b"r1", b"r2"))
    assert anomalies(out) == ["identity_change"] and s.user == "sip:alice@b.example"
    s.data_received(True, message("hi again"))
    assert checker.calls[-1][1].sender == "sip:alice@b.example"


def test_subject_is_checked_blocked_and_masked():
    """The Subject header (s:) is free text clients show: checked on its own; block refuses, mask rewrites it."""
    checker = Checker(block=("secret",), mask={"hunter2": "*******"})
    s, _ = make(checker)
    out = s.data_received(True, message("hello", extra=[("Subject", "the secret plan")]))
    assert sends(out, False) == b"" and parse(sends(out, True)).status == 403
    raw = message("hello", extra=[("s", "pw hunter2")], cseq=2)
    msg = parse(sends(s.data_received(True, raw), False))
    assert msg.get("subject") == "pw *******" and msg.body == b"hello" and msg.raw_values("s") == [b"s: pw *******"]
    assert [t for t, _ in checker.calls] == ["the secret plan", "pw hunter2", "hello"]


def test_text_body_in_another_request_is_checked():
    """INFO (or any request) with a text/plain body is no side channel: checked, blocked with 403 like a MESSAGE."""
    checker = Checker(block=("secret",))
    s, _ = make(checker)
    raw = message("the secret").replace(b"MESSAGE sip:", b"INFO sip:", 1).replace(b"1 MESSAGE", b"1 INFO")
    out = s.data_received(True, raw)
    assert sends(out, False) == b"" and parse(sends(out, True)).status == 403 and checker.calls


def test_composing_indications_are_not_checked():
    checker = Checker()
    s, _ = make(checker)
    raw = message("<isComposing/>", content_type="application/im-iscomposing+xml")
    assert s.data_received(True, raw) == [Send(False, raw)] and not checker.calls


def test_file_in_a_message_is_held_until_the_verdict():
    """A non-text MESSAGE body (an image) is held: InspectFile (mechanism sip-message); allowed -> the exact bytes;
    blocked -> 403 to the sender and nothing to the server."""
    s, _ = make()
    raw = message(b"\x89PNG\r\n\x1a\n" + bytes(100), content_type="image/png")
    out = s.data_received(True, raw)
    assert sends(out, False) == b""
    [job] = inspects(out)
    assert (job.data[:4], job.claimed_mime, job.context.transfer_mechanism) == (b"\x89PNG", "image/png", "sip-message")
    assert s.file_verdict(job.transfer_id, report(job), ALLOWED) == [Send(False, raw)]
    out = s.data_received(True, message(b"MZ" + bytes(50), content_type="application/octet-stream", cseq=2))
    [job] = inspects(out)
    out = s.file_verdict(job.transfer_id, report(job), BLOCKED)
    assert sends(out, False) == b"" and parse(sends(out, True)).status == 403
    assert s.file_verdict(job.transfer_id, report(job), ALLOWED) == []       # answered once


def test_inbound_file_in_a_message_is_held_and_its_receiver_told():
    """A file the proxy delivers to our user in a MESSAGE body: held (origin server) until the verdict; blocked, our
    user gets none of it and a notice in its own words, the outside sender the 403; allowed, the exact bytes."""
    s, _ = make()
    s.data_received(True, REGISTER)
    raw = message(b"MZ" + bytes(100), content_type="application/octet-stream", frm="<sip:bob@b.example>",
                  to="<sip:alice@b.example>", ruri="sip:alice@b.example")
    out = s.data_received(False, raw)
    assert sends(out, True) == b""
    [job] = inspects(out)
    assert (job.context.origin, job.context.sender, job.context.recipients) == (
        "server", "sip:bob@b.example", ("sip:alice@b.example",))
    out = s.file_verdict(job.transfer_id, report(job), BLOCKED)
    assert parse(sends(out, False)).status == 403
    note = parse(sends(out, True))
    assert note.method == "MESSAGE"
    assert note.body == b"imguard: a file from sip:bob@b.example was blocked (no programs)"
    out = s.data_received(False, raw.replace(b"CSeq: 1", b"CSeq: 2"))
    [job] = inspects(out)
    assert sends(s.file_verdict(job.transfer_id, report(job), ALLOWED), True) == raw.replace(b"CSeq: 1", b"CSeq: 2")


def test_allowed_file_with_a_notice_crosses_without_a_refusal():
    """An allowed file whose decision carries a notice: the MESSAGE crosses and no 403 goes back (it was not
    refused); our own sender gets the notice as a MESSAGE, an outside sender nothing."""
    from imguard.model import ALLOW, Decision

    s, _ = make()
    s.data_received(True, REGISTER)
    raw = message(b"\x89PNG\r\n\x1a\n" + bytes(100), content_type="image/png", cseq=3)
    [job] = inspects(s.data_received(True, raw))
    out = s.file_verdict(job.transfer_id, report(job), Decision(action=ALLOW, notice="images are logged"))
    assert sends(out, False) == raw
    note = parse(sends(out, True))
    assert note.method == "MESSAGE" and note.body == b"images are logged"
    [job] = inspects(s.data_received(False, raw.replace(b"CSeq: 3", b"CSeq: 4")))
    out = s.file_verdict(job.transfer_id, report(job), Decision(action=ALLOW, notice="images are logged"))
    assert sends(out, True) == raw.replace(b"CSeq: 3", b"CSeq: 4") and sends(out, False) == b""


def test_other_requests_and_responses_cross_untouched():
    s, _ = make()
    reg = sip("REGISTER sip:b.example SIP/2.0", [("Via", "SIP/2.0/TCP h;branch=z9hG4bK2"),
                                                 ("From", "<sip:alice@b.example>;tag=1"),
                                                 ("To", "<sip:alice@b.example>"),
                                                 ("Call-ID", "r1"), ("CSeq", "1 REGISTER"),
                                                 ("Contact", "<sip:alice@10.0.0.7:5099;transport=tcp>")])
    ok = sip("SIP/2.0 200 OK", [("Via", "SIP/2.0/TCP h;branch=z9hG4bK2"), ("Call-ID", "r1"), ("CSeq", "1 REGISTER")])
    assert sends(s.data_received(True, reg), False) == reg
    assert sends(s.data_received(False, ok), True) == ok
    assert (s.user, s.contact) == ("sip:alice@b.example", "sip:alice@10.0.0.7:5099")


def test_notice_to_the_user_and_its_response_swallowed():
    """notice(): a MESSAGE from sip:imguard@imguard.invalid to the user's contact; the UA's 200 stops here."""
    s, _ = make()
    s.data_received(True, message("hi", extra=[("Contact", "<sip:alice@10.0.0.7:5099;transport=tcp>")]))
    out = s.notice("imguard: the file 'x.exe' to bob was blocked")
    note = parse(sends(out, True))
    assert note.method == "MESSAGE" and note.request_uri == "sip:alice@10.0.0.7:5099"
    assert note.body == b"imguard: the file 'x.exe' to bob was blocked"
    ok = sip("SIP/2.0 200 OK", [("Via", note.get("via")), ("From", note.get("from")), ("To", note.get("to") + ";tag=u"),
                                ("Call-ID", note.call_id), ("CSeq", note.get("cseq"))])
    assert s.data_received(True, ok) == []


# --- INVITE / SDP -----------------------------------------------------------------------------------

def test_rfc5547_offer_and_answer_register_the_msrp_session():
    """The INVITE's file offer is stored (kind msrp) under the offerer's path key and (host, port); the 200 OK adds
    the answerer's. Name, size, type, sender and recipient come from the SDP and SIP headers. Bytes cross as they
    are."""
    s, transfers = make()
    invite, ok = load("rfc5547_invite.sip"), load("rfc5547_200ok.sip")
    out = s.data_received(True, invite)
    assert sends(out, False) == invite
    [event] = records(out, "msrp_offer")
    assert event["imguard"]["sip"]["file"]["name"] == "My cool picture.jpg"
    offer = find_msrp_offer_by_uri(transfers, "msrp://alicepc.example.com:7654/jshA7we;tcp")
    assert (offer.file.name, offer.file.size, offer.file.type, offer.file_direction) == (
        "My cool picture.jpg", 32349, "image/jpeg", "push")
    assert (offer.offerer, offer.answerer, offer.file_sender, offer.call_id) == (
        "sip:alice@example.com", "sip:bob@example.com", "sip:alice@example.com", "a84b4c76e66710")
    assert offer.context.connection_id == "s1" and offer.context.recipients == ("sip:bob@example.com",)
    assert find_msrp_offer(transfers, "alicepc.example.com", 7654) is offer
    assert sends(s.data_received(False, ok), True) == ok
    answered = find_msrp_offer(transfers, "bobpc.example.com", 8888)
    assert answered.answer_path == ("msrp://bobpc.example.com:8888/9di4ea;tcp",)
    assert find_msrp_offer_by_uri(transfers, "msrp://BOBPC.example.com:8888/9di4ea;tcp") is answered


def test_tls_msrp_recvonly_offer_from_the_server_side():
    """An inbound INVITE (to our user) offering to *pull* a file over TCP/TLS/MSRP: registered, tls, direction pull
    (the answerer, our user, sends); the c= address with the m= port is a key too."""
    sdp = ("v=0\r\no=bob 1 1 IN IP4 192.0.2.5\r\ns=-\r\nc=IN IP4 192.0.2.5\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
           "a=sendonly\r\nm=message 2855 TCP/TLS/MSRP *\r\na=recvonly\r\na=accept-types:*\r\n"
           "a=path:msrps://bob.example.net:2855/s3cr3t;tcp\r\n"
           'a=file-selector:name:"report \\"Q3\\".pdf" type:application/pdf size:1000\r\n').encode()
    raw = sip("INVITE sip:alice@10.0.0.7 SIP/2.0", [("Via", "SIP/2.0/TCP p;branch=z9hG4bK9"),
                                                   ("From", "<sip:bob@example.net>;tag=8"),
                                                   ("To", "<sip:alice@a.example>"),
                                                   ("Call-ID", "in1"), ("CSeq", "1 INVITE"),
                                                   ("Content-Type", "application/sdp")], sdp)
    s, transfers = make()
    assert sends(s.data_received(False, raw), True) == raw
    offer = find_msrp_offer(transfers, "192.0.2.5", 2855)
    assert offer.tls and not offer.outbound and offer.file_direction == "pull"
    assert offer.file.name == 'report "Q3".pdf' and offer.file_sender == "sip:alice@a.example"
    assert find_msrp_offer(transfers, "bob.example.net", 2855) is offer


def test_sdp_parsing_edges():
    assert parse_file_selector('name:"a b.txt" size:12 hash:sha-1:AA:BB').size == 12
    assert msrp_media("v=0\r\nm=audio 1 RTP/AVP 0\r\n") == []
    [m] = msrp_media("a=sendonly\r\nm=message 1 TCP/MSRP *\r\na=path:msrp://h:1/x;tcp\r\n")
    assert m.direction == "sendonly"


def test_bad_sdp_is_an_anomaly_and_the_invite_still_goes():
    sdp = b"v=0\r\nm=message 99999 TCP/MSRP *\r\na=path:msrp://h:1/x;tcp\r\n"
    raw = sip("INVITE sip:b@b SIP/2.0", [("Via", "SIP/2.0/TCP p;branch=z9hG4bK9"), ("From", "<sip:a@a>;tag=1"),
                                         ("To", "<sip:b@b>"), ("Call-ID", "x"), ("CSeq", "1 INVITE"),
                                         ("Content-Type", "application/sdp")], sdp)
    s, transfers = make()
    out = s.data_received(True, raw)
    assert anomalies(out) == ["sdp_bad_port"] and sends(out, False) == raw and len(transfers) == 0


# --- bad input --------------------------------------------------------------------------------------

def test_lying_content_length_over_the_limit_closes():
    """A Content-Length beyond sip_max_message_size is a lie we cannot frame around: anomaly, Close, nothing sent."""
    s, _ = make(limits=SipLimits(sip_max_message_size=2000))
    out = s.data_received(True, sip("MESSAGE sip:b@b SIP/2.0", [("From", "<sip:a@a>")], b"hi", length=10 ** 9))
    assert anomalies(out) == ["sip_content_length_too_large"] and isinstance(out[-1], Close)
    assert sends(out, False) == b"" and s.data_received(True, b"more") == []


def test_short_content_length_makes_garbage_and_closes():
    """A Content-Length shorter than the body: the rest is not a SIP start line -> anomaly and Close; the first
    message (with the body its length says) was checked before."""
    checker = Checker()
    s, _ = make(checker)
    raw = message("hello world").replace(b"Content-Length: 11", b"Content-Length: 5")
    out = s.data_received(True, raw + b"\r\n\r\n")
    assert checker.calls[0][0] == "hello"
    assert anomalies(out) == ["sip_bad_start_line"] and isinstance(out[-1], Close)


@pytest.mark.parametrize("raw,kind", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "sip_bad_start_line"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(50) + b"\r\n", "sip_bad_start_line"),
    (b"MESSAGE sip:b SIP/2.0\r\nnocolon\r\n\r\n", "sip_bad_header"),
    (b"MESSAGE sip:b SIP/2.0\r\nContent-Length: 1\r\nl: 2\r\n\r\nxx", "sip_bad_content_length"),
    (b"MESSAGE sip:b SIP/2.0\r\nContent-Length: -1\r\n\r\n", "sip_bad_content_length"),
])
def test_garbage_is_an_anomaly_not_an_exception(raw, kind):
    s, _ = make()
    out = s.data_received(True, raw)
    assert anomalies(out) == [kind] and isinstance(out[-1], Close) and sends(out, False) == b""


def test_headers_are_bounded():
    s, _ = make(limits=SipLimits(sip_max_header_size=1024))
    out = s.data_received(True, b"MESSAGE sip:b SIP/2.0\r\n" + b"X: " + b"a" * 2000)
    assert anomalies(out) == ["sip_header_too_long"]
    s, _ = make(limits=SipLimits(sip_max_headers=5))
    out = s.data_received(True, sip("OPTIONS sip:b SIP/2.0", [("X", str(i)) for i in range(10)]))
    assert anomalies(out) == ["sip_too_many_headers"]


def test_missing_content_length_on_a_stream_means_no_body():
    s, _ = make()
    raw = b"OPTIONS sip:b SIP/2.0\r\nVia: SIP/2.0/TCP h\r\n\r\n"
    assert sends(s.data_received(True, raw), False) == raw


def test_close_mid_message_is_an_anomaly():
    s, _ = make()
    raw = message("hello")
    assert s.data_received(True, raw[:-2]) == []
    assert anomalies(s.connection_closed(True)) == ["sip_incomplete_message"]


def test_anomalies_are_bounded_per_kind():
    handler = SipDatagramHandler(Checker(), None, CTX, SipLimits(sip_max_anomalies_per_kind=3))
    kinds = []
    for _ in range(10):
        kinds += anomalies(handler.datagram_received(True, b"garbage\r\n\r\n"))
    assert kinds == ["sip_bad_start_line"] * 3


# --- UDP ----------------------------------------------------------------------------------------------

def test_datagrams_one_message_each():
    """UDP: each datagram is one message; each Send is one datagram; a block answers with one 403 datagram; a
    longer datagram is cut to its Content-Length (RFC 3261 §18.3), a shorter one is dropped as an anomaly."""
    checker = Checker(block=("secret",), mask={"hunter2": "*******"})
    h = SipDatagramHandler(checker, ExpectedTransfers(), CTX)
    raw = message("hello")
    assert h.datagram_received(True, raw) == [Send(False, raw)]
    [send] = h.datagram_received(True, message("pw hunter2"))
    assert parse_datagram(send.data).body == b"pw *******"
    [send] = h.datagram_received(True, message("the secret"))
    assert send.to_client and parse_datagram(send.data).status == 403
    assert h.datagram_received(True, raw + b"trailing junk") == [Send(False, raw)]
    assert anomalies(h.datagram_received(True, raw[:-2])) == ["sip_content_length_mismatch"]
    no_length = raw.replace(b"Content-Length: 5\r\n", b"")
    assert h.datagram_received(True, no_length) == [Send(False, no_length)] and checker.calls[-1][0] == "hello"
    assert h.datagram_received(True, b"\r\n\r\n") == [Send(False, b"\r\n\r\n")]


def test_datagram_file_in_message():
    h = SipDatagramHandler(Checker(), None, CTX)
    out = h.datagram_received(True, message(b"\x00\x01binary", content_type="application/octet-stream"))
    [job] = [c for c in out if isinstance(c, InspectFile)]
    out = h.file_verdict(job.transfer_id, report(job), BLOCKED)
    assert len(out) == 1 and out[0].to_client and parse_datagram(out[0].data).status == 403


def test_table_kind_is_msrp():
    s, transfers = make()
    s.data_received(True, load("rfc5547_invite.sip"))
    assert transfers.get(("alicepc.example.com", 7654), kind=MSRP_KIND) is not None
    assert transfers.get(("alicepc.example.com", 7654), kind="dcc") is None


def test_decoder_failure_is_sticky():
    """What was framed before the error comes out, then the error; nothing after it, ever."""
    d = SipStreamDecoder()
    raw = load("rfc3428_message.sip")
    first, error = d.feed(raw + b"BOGUS\r\n\r\n")
    assert first.raw == raw and isinstance(error, SipFramingError) and error.kind == "sip_bad_start_line"
    assert d.feed(raw) == []
