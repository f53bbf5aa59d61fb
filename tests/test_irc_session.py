"""IrcSession as transcripts: bytes in from the client or the server, commands out."""

from __future__ import annotations

import base64

import pytest

from imguard.files.expected import ExpectedTransfers
from imguard.model import FROM_CLIENT, FROM_SERVER, ChatContext
from imguard.protocols.base import Close, StartTls
from imguard.protocols.irc.dcc import DCC_KIND, find_offer
from imguard.protocols.irc.decoder import IrcLimits
from imguard.protocols.irc.session import DccRelay, IrcSession
from tests.test_irc_support import Checker, anomalies, feed, records, sends, side, transcript

CTX = ChatContext(client_address="10.0.0.7:59069", server_address="10.0.0.22:6667", connection_id="c1")
WELCOME = b":irc.test 001 alice :Welcome to the Internet Relay Network alice!~alice@127.0.0.1\r\n"


def make(checker=None, **kw):
    transfers = ExpectedTransfers()
    return IrcSession(checker or Checker(), transfers, CTX, **kw), transfers


def registered(checker=None, **kw):
    s, t = make(checker, **kw)
    feed(s, [(True, b"NICK alice\r\nUSER alice 0 * :Alice A.\r\n"), (False, WELCOME)])
    return s, t


# --- real transcripts -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["zeek_irc_basic.json", "zeek_irc_more_commands_0.json",
                                  "zeek_irc_more_commands_1.json", "ndpi_irc.json", "ngircd_dcc_bob.json"])
def test_allowed_transcript_crosses_byte_exact(name):
    """With an allow-all checker every byte of a real session crosses unchanged, in both directions."""
    s, _ = make()
    out = feed(s, transcript(name))
    assert sends(out, to_client=False) == side(name, True)
    assert sends(out, to_client=True) == side(name, False)
    assert not anomalies(out)


def test_irc_basic_message_reaches_the_checker():
    """irc-basic's `PRIVMSG #brotest test`: protocol irc, sender brotest, recipient and conversation #brotest."""
    checker = Checker()
    s, _ = make(checker)
    feed(s, transcript("zeek_irc_basic.json"))
    [(text, ctx), (quit_text, _)] = checker.calls
    assert (text, quit_text) == ("test", "quitting")          # QUIT reasons are checked too
    assert (ctx.protocol, ctx.sender, ctx.recipients, ctx.conversation) == ("irc", "brotest", ("#brotest",),
                                                                           "#brotest")
    assert ctx.client_address == CTX.client_address and s.host == "new-wifi-nat.ICSI.Berkeley.EDU"


def test_more_commands_cap_and_pre_registration_rename():
    """irc-more-commands #2: CAP LS/REQ/END pass; `433 tim` then `NICK tim_`: the identity is tim_ (welcomed)."""
    s, _ = make()
    out = feed(s, transcript("zeek_irc_more_commands_1.json"))
    assert b"CAP REQ :multi-prefix\r\n" in sends(out, False) and b"CAP END\r\n" in sends(out, False)
    assert (s.nick, s.identity, s.user, s.host) == ("tim_", "tim_", "tim", "172.16.238.1")
    [reg] = records(out, "irc_registered")
    assert reg["imguard"]["irc"]["nick"] == "tim_"


def test_dcc_capture_offer_is_registered():
    """zeek irc-dcc-send: the 4 channel messages are checked; the DCC SEND lands in the table under (10.0.0.7, 59130)
    with its name, size, sender and receiver; the DCC CHAT offer too; all bytes cross unchanged."""
    checker = Checker()
    s, transfers = make(checker)
    out = feed(s, transcript("zeek_irc_dcc_send_control.json"))
    assert sends(out, False) == side("zeek_irc_dcc_send_control.json", True)
    assert [t for t, c in checker.calls if c.origin == FROM_CLIENT] == [
        "hi, i'm chatting for some packets", "more packets", "more packets!", "even more packets!", "leaving"]
    # tim1's channel messages, delivered to our user tim2, are decided too (inbound): sender his full mask.
    inbound = [(t, c.sender, c.recipients, c.conversation) for t, c in checker.calls if c.origin == FROM_SERVER]
    assert inbound == [(text, "tim1!tim@10.0.0.22", ("#testing",), "#testing")
                       for text in ("do we still need more packets?", "maybe we do")]
    offer = find_offer(transfers, "10.0.0.7", 59130)
    assert (offer.kind, offer.name, offer.size, offer.sender, offer.receiver) == ("send", "ssh.trace", 1320211,
                                                                                   "tim2", "tim1")
    assert offer.listener_is_sender and offer.outbound and offer.context.connection_id == "c1"
    assert offer.context.transfer_mechanism == "dcc" and offer.context.recipients == ("tim1",)
    chat = find_offer(transfers, "10.0.0.7", 59214)
    assert chat.kind == "chat"
    assert len(records(out, "dcc_offer")) == 2


def test_ngircd_capture_offer_from_the_server_side():
    """bob's side of the ngIRCd capture: an offer made *to* our user is registered too (inbound file)."""
    s, transfers = make()
    feed(s, transcript("ngircd_dcc_bob.json"))
    offer = find_offer(transfers, "127.0.0.1", 16800)
    assert (offer.name, offer.size, offer.sender, offer.receiver, offer.outbound) == (
        "eicar.com", 6800, "alice!~alice@127.0.0.1", "bob", False)


# --- policy -----------------------------------------------------------------------------------------

def test_block_drops_and_notices_the_sender():
    """A blocked PRIVMSG must NOT reach the server; the sender gets `:imguard NOTICE alice :...`."""
    s, _ = registered(Checker(block=("hunter2",)))
    out = s.data_received(True, b"PRIVMSG #ops :the password is hunter2\r\nPRIVMSG #ops :ok\r\n")
    assert sends(out, False) == b"PRIVMSG #ops :ok\r\n"
    notice = sends(out, True)
    assert notice.startswith(b":imguard NOTICE alice :") and notice.endswith(b"\r\n")
    assert b"#ops" in notice and b"no hunter2" in notice


def test_block_uses_the_policy_notice_and_strips_control_characters():
    s, _ = registered(Checker(block=("secret",), notice="Blocked:\r\nQUIT by rule"))
    out = s.data_received(True, b"PRIVMSG bob :secret\r\n")
    assert sends(out, True) == b":imguard NOTICE alice :Blocked: QUIT by rule\r\n"
    assert sends(out, False) == b""


def test_mask_rewrites_only_the_text():
    """Mask: tags and target kept, the text rewritten."""
    s, _ = registered(Checker(mask={"4111111111111111": "****"}))
    out = s.data_received(True, b"@+draft/reply=x PRIVMSG bob :card 4111111111111111 ok\r\n")
    assert sends(out, False) == b"@+draft/reply=x PRIVMSG bob :card **** ok\r\n"
    assert sends(out, True) == b""


def test_mask_inside_ctcp_action():
    """/me text is checked and masked inside its CTCP ACTION wrapper."""
    checker = Checker(mask={"hunter2": "*******"})
    s, _ = registered(checker)
    out = s.data_received(True, b"PRIVMSG #ops :\x01ACTION types hunter2\x01\r\n")
    assert checker.calls[0][0] == "types hunter2"
    assert sends(out, False) == b"PRIVMSG #ops :\x01ACTION types *******\x01\r\n"


def test_quit_reason_blocked_but_quit_goes():
    """A blocked QUIT reason: the QUIT still reaches the server, without its text."""
    s, _ = registered(Checker(block=("secret",)))
    out = s.data_received(True, b"QUIT :the secret is out\r\n")
    assert sends(out, False) == b"QUIT\r\n"
    assert b"NOTICE alice" in sends(out, True)


def test_topic_is_checked_with_the_channel():
    checker = Checker(block=("secret",))
    s, _ = registered(checker)
    out = s.data_received(True, b"TOPIC #ops :secret plans\r\n")
    assert sends(out, False) == b"" and checker.calls[0][1].conversation == "#ops"


def test_multiple_targets_and_statusmsg():
    """`PRIVMSG bob,@#ops :x`: both recipients; the conversation is the channel without its status prefix."""
    checker = Checker()
    s, _ = registered(checker)
    s.data_received(True, b"PRIVMSG bob,@#ops :x\r\n")
    assert checker.calls[0][1].recipients == ("bob", "@#ops") and checker.calls[0][1].conversation == "#ops"


def test_ambiguous_privmsg_is_dropped():
    """`PRIVMSG a b :c` (servers differ on the text): dropped with an anomaly, not forwarded unchecked."""
    s, _ = registered()
    out = s.data_received(True, b"PRIVMSG a b :c\r\n")
    assert sends(out, False) == b"" and anomalies(out) == ["ambiguous_message"]


def test_server_lines_that_are_not_chat_cost_no_policy():
    """Numerics, JOIN, PART, MODE, the server's own notices and our own echoed line are only forwarded."""
    checker = Checker(block=("secret",))
    s, _ = registered(checker)
    lines = (b":irc.test 372 alice :- secret motd\r\n:bob!b@h JOIN #ops\r\n:bob!b@h PART #ops :secret\r\n"
             b":irc.test NOTICE alice :*** secret server notice\r\nNOTICE AUTH :*** secret\r\n"
             b":bob!b@h MODE #ops +o alice\r\n:alice!~alice@127.0.0.1 PRIVMSG #ops :secret echo\r\n")
    assert sends(s.data_received(False, lines), True) == lines and not checker.calls


def test_inbound_message_allowed_crosses_byte_exact():
    """A PRIVMSG from someone on the server's side is decided: origin server, sender the prefix, recipient our user
    (a query) or the channel; allowed, the exact bytes reach our user."""
    checker = Checker()
    s, _ = registered(checker)
    lines = (b"@time=2024-01-01T00:00:00Z :bob!b@203.0.113.9 PRIVMSG alice :hi \xc3\xa9\r\n"
             b":carol!c@h PRIVMSG @#ops :to the ops\r\n:bob!b@203.0.113.9 NOTICE alice :\x01ACTION waves\x01\r\n")
    assert sends(s.data_received(False, lines), True) == lines
    got = [(t, c.origin, c.sender, c.recipients, c.conversation, c.protocol) for t, c in checker.calls]
    assert got == [("hi \u00e9", FROM_SERVER, "bob!b@203.0.113.9", ("alice",), "", "irc"),
                   ("to the ops", FROM_SERVER, "carol!c@h", ("@#ops",), "#ops", "irc"),
                   ("waves", FROM_SERVER, "bob!b@203.0.113.9", ("alice",), "", "irc")]
    assert checker.calls[0][1].client_address == CTX.client_address


def test_inbound_message_blocked_is_dropped_and_the_receiver_told():
    """A blocked inbound message never reaches our user; a NOTICE from imguard says from whom and why."""
    s, _ = registered(Checker(block=("secret",), notice="Your message was blocked (for the sender)"))
    out = s.data_received(False, b":bob!b@h PRIVMSG #ops :the secret plan\r\n:bob!b@h PRIVMSG #ops :ok\r\n"
                                 b":bob!b@h PRIVMSG alice :secret too\r\n")
    assert sends(out, False) == b""
    assert sends(out, True) == (b":imguard NOTICE alice :A message from bob to #ops was blocked by imguard: "
                                b"no secret\r\n:bob!b@h PRIVMSG #ops :ok\r\n"
                                b":imguard NOTICE alice :A message from bob was blocked by imguard: no secret\r\n")


def test_inbound_message_masked_is_rewritten():
    s, _ = registered(Checker(mask={"4111111111111111": "****"}))
    out = s.data_received(False, b"@a=b :bob!b@h PRIVMSG alice :card 4111111111111111\r\n"
                                 b":bob!b@h PRIVMSG alice :\x01ACTION pays 4111111111111111\x01\r\n")
    assert sends(out, True) == (b"@a=b :bob!b@h PRIVMSG alice :card ****\r\n"
                                b":bob!b@h PRIVMSG alice :\x01ACTION pays ****\x01\r\n")


def test_inbound_blocked_message_does_not_register_its_offer():
    s, transfers = registered(Checker(block=("secret",)))
    s.data_received(False, b":bob!b@h PRIVMSG alice :secret \x01DCC SEND f 3405803781 7000 5\x01\r\n")
    assert find_offer(transfers, "203.0.113.5", 7000) is None


def test_inbound_message_lines_that_cannot_be_decided_are_dropped():
    """From the server: a PRIVMSG with a NUL or bare CR, or with too many params, is not passed on undecided."""
    checker = Checker()
    s, _ = registered(checker)
    out = s.data_received(False, b":bob!b@h PRIVMSG alice :a\x00b\r\n:bob!b@h PRIVMSG alice :x\r:e!e@h NOTICE alice"
                                 b" :y\r\n:bob!b@h PRIVMSG alice extra :z\r\n:irc.test 372 alice :a\x00b\r\n")
    assert sends(out, True) == b":irc.test 372 alice :a\x00b\r\n"
    assert anomalies(out) == ["nul_byte", "bare_cr", "ambiguous_message", "nul_byte"]


def test_outbound_contexts_say_from_the_client():
    checker = Checker()
    s, transfers = registered(checker)
    s.data_received(True, b"PRIVMSG #ops :hello\r\nPRIVMSG bob :\x01DCC SEND f.bin 167772167 5000 100\x01\r\n")
    assert [c.origin for _, c in checker.calls] == [FROM_CLIENT]
    assert find_offer(transfers, "10.0.0.7", 5000).context.origin == FROM_CLIENT


# --- identity ---------------------------------------------------------------------------------------

def test_rename_keeps_the_identity():
    """After `NICK carol` (confirmed by the server) events still say alice; notices go to carol."""
    checker = Checker(block=("x",))
    s, _ = registered(checker)
    s.data_received(True, b"NICK carol\r\n")
    assert s.nick == "alice"            # not confirmed yet
    out = s.data_received(False, b":alice!~alice@127.0.0.1 NICK :carol\r\n")
    [ev] = records(out, "irc_nick_change")
    assert ev["imguard"]["irc"] == {"old_nick": "alice", "new_nick": "carol", "identity": "alice"}
    out = s.data_received(True, b"PRIVMSG #c :x\r\n")
    assert checker.calls[-1][1].sender == "alice"
    assert sends(out, True).startswith(b":imguard NOTICE carol :")
    s.data_received(False, b":carol!~alice@127.0.0.1 NICK dave\r\n")
    assert (s.nick, s.identity, s.mask) == ("dave", "alice", "dave!~alice@127.0.0.1")


def test_server_lines_from_others_cannot_rename_our_user():
    """Attack transcript: another user's rename, a second welcome naming someone else and a second account login
    must NOT change who our user is: her next message is still decided as alice's; the last two are anomalies."""
    checker = Checker()
    s, _ = registered(checker)
    out = feed(s, [(False, b":mallory!m@evil NICK :alice2\r\n"),
                   (False, b":irc.test 001 security-team :Welcome security-team!s@h\r\n"),
                   (False, b":irc.test 900 alice alice!~alice@127.0.0.1 alice :You are now logged in as alice\r\n"),
                   (False, b":irc.test 900 alice sec!s@h security-team :You are now logged in as security-team\r\n"),
                   (False, b":irc.test 901 alice alice!~alice@127.0.0.1 :You are now logged out\r\n"),
                   (True, b"PRIVMSG #c :hello\r\n")])
    assert anomalies(out) == ["identity_change", "identity_change"]
    assert (s.nick, s.identity, s.account) == ("alice", "alice", "alice")
    assert checker.calls[-1][1].sender == "alice"


def test_rejected_rename_changes_nothing():
    s, _ = registered()
    s.data_received(True, b"NICK bob\r\n")
    s.data_received(False, b":irc.test 433 alice bob :Nickname is already in use\r\n")
    assert s.nick == "alice"


def test_sasl_plain_account_labels_events():
    """CAP REQ sasl, AUTHENTICATE PLAIN + base64(authzid\\0authcid\\0password), 903: the account labels events;
    the password is not kept anywhere."""
    checker = Checker()
    s, _ = make(checker)
    plain = base64.b64encode(b"\x00alice.account\x00s3cret-pw").decode()
    out = feed(s, [(True, b"CAP LS 302\r\nNICK al\r\nUSER al 0 * :Al\r\n"),
                   (False, b":irc.test CAP * LS :sasl multi-prefix\r\n"),
                   (True, b"CAP REQ :sasl\r\n"), (False, b":irc.test CAP al ACK :sasl\r\n"),
                   (True, b"AUTHENTICATE PLAIN\r\n"), (False, b"AUTHENTICATE +\r\n"),
                   (True, f"AUTHENTICATE {plain}\r\n".encode()),
                   (False, b":irc.test 903 al :SASL authentication successful\r\n"),
                   (True, b"CAP END\r\n"), (False, b":irc.test 001 al :Welcome al!al@h\r\n"),
                   (True, b"PRIVMSG #c :hello\r\n")])
    assert s.account == "alice.account"
    assert checker.calls[0][1].sender == "alice.account"
    assert records(out, "irc_registered")[0]["imguard"]["irc"]["identity"] == "alice.account"
    assert "s3cret" not in repr(vars(s)) and "s3cret" not in repr(records(out))


def test_sasl_900_account_wins():
    s, _ = make()
    feed(s, [(True, b"NICK al\r\n"),
             (False, b":irc.test 900 al al!u@h realacct :You are now logged in as realacct\r\n")])
    assert s.account == "realacct" and s.sender == "realacct"


def test_sasl_in_400_byte_chunks():
    """AUTHENTICATE payloads are cut in 400-byte chunks; the account is read once the last chunk comes."""
    s, _ = make()
    plain = base64.b64encode(b"\x00" + b"a" * 400 + b"\x00pw").decode()
    chunks = [plain[i:i + 400] for i in range(0, len(plain), 400)]
    feed(s, [(True, b"AUTHENTICATE PLAIN\r\n")] + [(True, f"AUTHENTICATE {c}\r\n".encode()) for c in chunks]
         + [(False, b":irc.test 903 x :ok\r\n")])
    assert s.account == "a" * 400


# --- STARTTLS ---------------------------------------------------------------------------------------

def test_starttls_from_the_capture():
    """zeek irc-starttls: STARTTLS forwarded, 670 forwarded, then StartTls; after tls_started() lines flow again."""
    s, _ = make()
    out = feed(s, transcript("zeek_irc_starttls_plain.json"))
    assert sends(out, False) == b"STARTTLS\r\n"
    assert out[-1] == StartTls() and sends(out, True).startswith(b":irc.joulunet.org 670")
    assert s.tls_started() == []
    assert sends(s.data_received(True, b"NICK a\r\n"), False) == b"NICK a\r\n"


def test_starttls_injection_is_dropped():
    """Plaintext pipelined after 670 (the STARTTLS command-injection attack) never crosses."""
    s, _ = make()
    s.data_received(True, b"STARTTLS\r\n")
    out = s.data_received(False, b":srv 670 * :go ahead\r\n:srv NOTICE * :injected\r\n")
    assert sends(out, True) == b":srv 670 * :go ahead\r\n"
    assert out[-1] == StartTls() and "starttls_injection" in anomalies(out)
    out = s.data_received(True, b"PRIVMSG x :before tls\r\n")
    assert sends(out, False) == b"" and anomalies(out) == ["starttls_injection"]


def test_client_lines_pipelined_after_starttls_are_dropped():
    """A PASS pipelined after STARTTLS (before the 670) must NOT reach the server in plaintext; after a 691
    refusal the client speaks in plaintext again."""
    s, _ = make()
    out = s.data_received(True, b"STARTTLS\r\nPASS hunter2\r\n")
    assert sends(out, False) == b"STARTTLS\r\n" and anomalies(out) == ["starttls_injection"]
    s.data_received(False, b":srv 691 * :STARTTLS failed\r\n")
    assert sends(s.data_received(True, b"NICK a\r\n"), False) == b"NICK a\r\n"


def test_670_without_starttls_does_not_switch():
    s, _ = make()
    out = s.data_received(False, b":srv 670 * :go ahead\r\n")
    assert not any(isinstance(c, StartTls) for c in out) and anomalies(out) == ["unexpected_starttls_reply"]


def test_starttls_when_already_tls():
    """With tls_on_connect a STARTTLS is an anomaly and a 670 never produces a second StartTls."""
    s, _ = make(tls_on_connect=True)
    out = feed(s, [(True, b"STARTTLS\r\n"), (False, b":srv 670 * :go\r\n")])
    assert not any(isinstance(c, StartTls) for c in out)
    assert "starttls_in_tls" in anomalies(out)


# --- bad input --------------------------------------------------------------------------------------

def test_endless_line_is_an_anomaly_and_closes():
    s, _ = make(limits=IrcLimits(max_line_length=1024))
    out = []
    for _ in range(100):
        out += s.data_received(True, b"PRIVMSG #c :" + b"A" * 50)
    assert anomalies(out) == ["line_too_long"] and isinstance(out[-1], Close)
    assert sends(out, False) == b""
    assert s.data_received(True, b"\r\n") == []


def test_overlong_line_is_recorded_and_still_checked():
    checker = Checker()
    s, _ = registered(checker)
    out = s.data_received(True, b"PRIVMSG #c :" + b"y" * 600 + b"\r\n")
    assert anomalies(out) == ["overlong_line"] and checker.calls and sends(out, False)


def test_bare_cr_and_nul_from_the_client_are_dropped():
    s, _ = registered()
    out = s.data_received(True, b"PRIVMSG a :hi\rPRIVMSG b :secret\r\nPRIVMSG a :\x00x\r\n")
    assert sends(out, False) == b"" and anomalies(out) == ["bare_cr", "nul_byte"]


def test_partial_line_at_close_is_not_forwarded():
    s, _ = registered()
    assert sends(s.data_received(True, b"PRIVMSG a :no end"), False) == b""
    assert anomalies(s.connection_closed(True)) == ["incomplete_line"]


@pytest.mark.parametrize("args,kind", [
    ("SEND x 167772167 5000 -1", "dcc_bad_size"),
    ("SEND x 167772167 5000 99999999999999999999999", "dcc_bad_size"),
    ("SEND x 167772167 70000 10", "dcc_bad_port"),
    ("SEND x garbage 5000 10", "dcc_bad_address"),
    ("SSEND x 167772167 5000 10", "dcc_unsupported"),
    ("SEND x 167772167 5000 \u00b2", "dcc_bad_size"),          # '²'.isdigit() is true; int('²') raises
    ("SEND x 167772167 \u00b2 10", "dcc_bad_port"),
    ("SEND x \u00b2 5000 10", "dcc_bad_address"),
    ("SEND x 167772167 5000 \u0663", "dcc_bad_size"),          # int('٣') is 3: not the digits a client reads
])
def test_bad_dcc_is_an_anomaly_and_refused(args, kind):
    """A DCC offer with bad numbers: anomaly, the line is dropped, the sender is told; nothing in the table."""
    s, transfers = registered()
    out = s.data_received(True, f"PRIVMSG bob :\x01DCC {args}\x01\r\n".encode())
    assert anomalies(out) == [kind]
    assert sends(out, False) == b"" and b"NOTICE alice" in sends(out, True)
    assert len(transfers) == 0


def test_bad_dcc_from_the_server_is_dropped_quietly():
    s, _ = registered()
    out = s.data_received(False, b":m!m@h PRIVMSG alice :\x01DCC SEND x 167772167 5000 -1\x01\r\n")
    assert anomalies(out) == ["dcc_bad_size"] and sends(out, True) == b""


def test_one_line_from_a_remote_user_cannot_break_the_session():
    """A remote user's DCC offer with superscript digits used to raise (the carrier then closed our user's
    connection, or with fail mode parse=open relayed the rest uninspected): now an anomaly, and the session goes
    on deciding: the next blocked message is still blocked, the next allowed one crosses."""
    s, _ = registered(Checker(block=("secret",)))
    out = s.data_received(False, ":m!m@h PRIVMSG alice :\x01DCC SEND x 167772167 5000 \u00b2\x01\r\n".encode())
    assert anomalies(out) == ["dcc_bad_size"] and sends(out, True) == b""
    assert sends(s.data_received(False, b":m!m@h PRIVMSG alice :the secret\r\n"), True).startswith(b":imguard NOTICE")
    assert sends(s.data_received(False, b":m!m@h PRIVMSG alice :hello\r\n"), True) == b":m!m@h PRIVMSG alice :hello\r\n"


def test_too_large_offer_is_refused():
    s, transfers = registered(limits=IrcLimits(max_held_bytes=1000))
    out = s.data_received(True, b"PRIVMSG bob :\x01DCC SEND big.iso 167772167 5000 1001\x01\r\n")
    assert sends(out, False) == b"" and b"cannot be inspected" in sends(out, True)
    assert len(transfers) == 0 and records(out, "dcc_refused")


def test_fuzz_never_raises():
    """Random bytes in both directions never raise (every chunk split)."""
    import random
    rnd = random.Random(4)
    alphabet = b"PRIVMSG NICK :\x01DCC SEND 0123456789 \r\n@=;!#\x00\r\xff"
    for _ in range(200):
        s, _ = make(limits=IrcLimits(max_line_length=300))
        for _ in range(20):
            s.data_received(rnd.random() < 0.5, bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 80))))


# --- DCC offers and the relay -----------------------------------------------------------------------

def test_relay_rewrites_the_offer_and_keeps_the_real_address():
    """With dcc_relay the receiver is sent the gateway's address; the table keeps the real one."""
    ports = iter([40001, 40002])
    s, transfers = registered(dcc_relay=("192.0.2.1", lambda offer: next(ports)))
    out = s.data_received(True, b"PRIVMSG bob :\x01DCC SEND ssh.trace 167772167 59130 1320211\x01\r\n")
    assert sends(out, False) == b"PRIVMSG bob :\x01DCC SEND ssh.trace 3221225985 40001 1320211\x01\r\n"
    assert find_offer(transfers, "10.0.0.7", 59130, take=False) is None
    offer = find_offer(transfers, "192.0.2.1", 40001)
    assert offer.real_address == ("10.0.0.7", 59130) and offer.key == ("192.0.2.1", 40001)


def test_relay_resume_and_accept_translate_ports():
    """RESUME from the receiver carries the relay port: the sender gets its real port; ACCEPT the reverse.
    The table entry is renewed with the position."""
    s, transfers = registered(dcc_relay=DccRelay("192.0.2.1", lambda offer: 40001))
    s.data_received(True, b"PRIVMSG bob :\x01DCC SEND f.bin 167772167 5000 100\x01\r\n")
    out = s.data_received(False, b":bob!b@h PRIVMSG alice :\x01DCC RESUME f.bin 40001 60\x01\r\n")
    assert sends(out, True) == b":bob!b@h PRIVMSG alice :\x01DCC RESUME f.bin 5000 60\x01\r\n"
    out = s.data_received(True, b"PRIVMSG bob :\x01DCC ACCEPT f.bin 5000 60\x01\r\n")
    assert sends(out, False) == b"PRIVMSG bob :\x01DCC ACCEPT f.bin 40001 60\x01\r\n"
    assert transfers.get(("192.0.2.1", 40001), kind=DCC_KIND).position == 60


def test_relay_failure_refuses_the_offer():
    def broken(offer):
        raise OSError("no ports left")
    s, transfers = registered(dcc_relay=("192.0.2.1", broken))
    out = s.data_received(True, b"PRIVMSG bob :\x01DCC SEND f.bin 167772167 5000 100\x01\r\n")
    assert sends(out, False) == b"" and anomalies(out) == ["dcc_relay_failed"] and len(transfers) == 0


def test_passive_dcc_is_matched_by_token():
    """Reverse DCC: alice offers with port 0 and a token; bob's reply (his address, same token) is what gets
    registered: bob listens, alice connects and sends."""
    s, transfers = registered()
    s.data_received(True, b"PRIVMSG bob :\x01DCC SEND f.bin 167772167 0 100 77\x01\r\n")
    assert len(transfers) == 0
    s.data_received(False, b":bob!b@h PRIVMSG alice :\x01DCC SEND f.bin 3232235777 6000 100 77\x01\r\n")
    offer = find_offer(transfers, "192.168.1.1", 6000)
    assert (offer.sender, offer.receiver, offer.listener_is_sender, offer.size) == ("alice", "bob", False, 100)


def test_blocked_message_does_not_register_its_offer():
    s, transfers = registered(Checker(block=("bad",)))
    s.data_received(True, b"PRIVMSG bob :bad \x01DCC SEND f.bin 167772167 5000 100\x01\r\n")
    assert len(transfers) == 0


def test_notice_for_the_carrier():
    """IrcSession.notice() is how the carrier tells this connection's user about a blocked DCC file."""
    s, _ = registered()
    assert sends(s.notice("file blocked\r\n"), True) == b":imguard NOTICE alice :file blocked\r\n"


# --- IRCv3 CAP and client-only tags -----------------------------------------------------------------

def test_cap_ack_is_tracked():
    """zeek irc-dcc-send's CAP REQ/ACK: the negotiated capabilities are known when the welcome comes."""
    s, _ = make()
    out = feed(s, transcript("zeek_irc_dcc_send_control.json"))
    assert {"multi-prefix", "server-time", "account-notify"} <= s.caps
    assert "server-time" in records(out, "irc_registered")[0]["imguard"]["irc"]["caps"]


def test_client_only_tag_values_are_checked():
    """`@+example/note=...` rides to other clients: its value is checked; blocked drops the TAGMSG."""
    checker = Checker(block=("secret",))
    s, _ = registered(checker)
    out = s.data_received(True, b"@+example/note=the\\ssecret TAGMSG #ops\r\n")
    assert checker.calls[0][0] == "the secret" and sends(out, False) == b""
    assert b"NOTICE alice" in sends(out, True)


def test_masked_client_tags_are_stripped():
    s, _ = registered(Checker(mask={"secret": "***"}))
    out = s.data_received(True, b"@label=1;+example/note=secret PRIVMSG #ops :hi\r\n")
    assert sends(out, False) == b"@label=1 PRIVMSG #ops :hi\r\n"


def test_typing_tags_are_not_checked():
    checker = Checker()
    s, _ = registered(checker)
    line = b"@+typing=active TAGMSG #ops\r\n"
    assert sends(s.data_received(True, line), False) == line and not checker.calls


def test_inbound_offer_is_relayed_too():
    """An offer made to our user (server -> client) is rewritten to the relay as well: the data crosses the gateway."""
    s, transfers = registered(dcc_relay=("192.0.2.1", lambda offer: 40009))
    out = s.data_received(False, b":mallory!m@203.0.113.5 PRIVMSG alice :\x01DCC SEND x.exe 3405803781 7000 50\x01\r\n")
    assert sends(out, True) == b":mallory!m@203.0.113.5 PRIVMSG alice :\x01DCC SEND x.exe 3221225985 40009 50\x01\r\n"
    offer = find_offer(transfers, "192.0.2.1", 40009)
    assert offer.real_address == ("203.0.113.5", 7000) and not offer.outbound
    assert (offer.sender, offer.receiver) == ("mallory!m@203.0.113.5", "alice")
    assert (offer.context.origin, offer.context.sender, offer.context.recipients) == (
        FROM_SERVER, "mallory!m@203.0.113.5", ("alice",))


def test_passive_reply_from_our_user():
    """Reverse DCC offered *to* our user: our user's reply (its own address + token) is registered; the remote
    sender connects to it."""
    s, transfers = registered()
    s.data_received(False, b":mallory!m@h PRIVMSG alice :\x01DCC SEND x.bin 3405803781 0 50 tok9\x01\r\n")
    s.data_received(True, b"PRIVMSG mallory :\x01DCC SEND x.bin 167772167 6001 50 tok9\x01\r\n")
    offer = find_offer(transfers, "10.0.0.7", 6001)
    assert (offer.sender, offer.receiver, offer.listener_is_sender) == ("mallory!m@h", "alice", False)
    assert offer.context.origin == FROM_SERVER and not offer.outbound


def test_passive_inbound_reply_is_rewritten_to_the_relay():
    """Reverse DCC offered to our user: its answer (our user's own address) is rewritten to the relay, so the
    outside sender connects to the gateway, which connects on to our user."""
    s, transfers = registered(dcc_relay=("192.0.2.1", lambda offer: 40011))
    s.data_received(False, b":mallory!m@h PRIVMSG alice :\x01DCC SEND x.bin 3405803781 0 50 tok9\x01\r\n")
    out = s.data_received(True, b"PRIVMSG mallory :\x01DCC SEND x.bin 167772167 6001 50 tok9\x01\r\n")
    assert sends(out, False) == b"PRIVMSG mallory :\x01DCC SEND x.bin 3221225985 40011 50 tok9\x01\r\n"
    offer = find_offer(transfers, "192.0.2.1", 40011)
    assert offer.real_address == ("10.0.0.7", 6001) and not offer.listener_is_sender
    assert (offer.sender, offer.context.origin) == ("mallory!m@h", FROM_SERVER)


def test_echoed_own_offer_does_not_overwrite_the_entry():
    """With echo-message the server sends our own offer back: it is not a new inbound offer."""
    s, transfers = registered()
    s.data_received(True, b"PRIVMSG bob :\x01DCC SEND f.bin 167772167 5000 100\x01\r\n")
    s.data_received(False, b":alice!~alice@127.0.0.1 PRIVMSG bob :\x01DCC SEND f.bin 167772167 5000 100\x01\r\n")
    offer = find_offer(transfers, "10.0.0.7", 5000)
    assert offer.outbound and offer.sender == "alice" and offer.receiver == "bob"


def test_mask_cannot_smuggle_ctcp():
    s, _ = registered(Checker(mask={"x": "\x01DCC SEND evil 1 2 3\x01"}))
    out = s.data_received(True, b"PRIVMSG bob :x\r\n")
    assert b"\x01" not in sends(out, False)


def test_cprivmsg_is_checked():
    checker = Checker(block=("secret",))
    s, _ = registered(checker)
    out = s.data_received(True, b"CPRIVMSG bob #ops :secret\r\n")
    assert sends(out, False) == b"" and checker.calls[0][1].conversation == "#ops"


def test_session_chunk_boundaries():
    """Fed one byte at a time, or with the client side split at many points, the zeek DCC session gives the same
    forwarded bytes, the same checks and the same offer."""
    segments = transcript("zeek_irc_dcc_send_control.json")

    def run(split):
        checker = Checker(mask={"packets": "p"})
        s, transfers = make(checker)
        out = []
        for from_client, data in segments:
            for piece in split(data):
                out += s.data_received(from_client, piece)
        offer = find_offer(transfers, "10.0.0.7", 59130)
        return sends(out, False), sends(out, True), [t for t, _ in checker.calls], (offer.name, offer.size)

    whole = run(lambda d: [d])
    assert b"PRIVMSG #testing :more p!\r\n" in whole[0] and whole[3] == ("ssh.trace", 1320211)
    assert run(lambda d: [d[i:i + 1] for i in range(len(d))]) == whole
    client = b"".join(d for fc, d in segments if fc)
    for cut in range(1, len(client), 5):
        s, _ = make(Checker(mask={"packets": "p"}))
        out = s.data_received(True, client[:cut]) + s.data_received(True, client[cut:])
        assert sends(out, False) == whole[0], cut


def test_anomalies_per_kind_are_bounded():
    """A client repeating a bad line gets max_anomalies_per_kind records, the last one marked, then only counts."""
    s, _ = registered(limits=IrcLimits(max_anomalies_per_kind=3))
    out = s.data_received(True, b"PRIVMSG a :\x00\r\n" * 10)
    evs = records(out, "anomaly")
    assert len(evs) == 3 and evs[-1]["imguard"]["anomaly"]["further_suppressed"]
    assert s.anomaly_counts["nul_byte"] == 10 and sends(out, False) == b""


def test_lines_before_an_endless_line_still_cross():
    """In one chunk: a good line, then bytes that never end. The good line crosses, then anomaly and Close."""
    s, _ = registered(limits=IrcLimits(max_line_length=200))
    out = s.data_received(True, b"PRIVMSG #c :fine\r\n" + b"B" * 300)
    assert sends(out, False) == b"PRIVMSG #c :fine\r\n"
    assert anomalies(out) == ["line_too_long"] and isinstance(out[-1], Close)


def test_passive_offer_between_two_inside_users_belongs_to_its_sender():
    """alice and bob both behind the gateway, reverse DCC: bob's session registers bob's answer (an inbound offer to
    bob); when alice's session sees the rewritten answer, the offer becomes alice's outbound file (her connection
    is told, its origin is the client's)."""
    transfers = ExpectedTransfers()
    relay = ("192.0.2.1", lambda offer: 40030)
    alice = IrcSession(Checker(), transfers, CTX, dcc_relay=relay)
    bob = IrcSession(Checker(), transfers, CTX.with_(connection_id="c2"), dcc_relay=relay)
    feed(alice, [(True, b"NICK alice\r\nUSER alice 0 * :A\r\n"), (False, WELCOME)])
    feed(bob, [(True, b"NICK bob\r\nUSER bob 0 * :B\r\n"), (False, WELCOME.replace(b"alice", b"bob"))])
    offer = b"PRIVMSG bob :\x01DCC SEND f.bin 2130706433 0 5 tk\x01\r\n"
    alice.data_received(True, offer)
    bob.data_received(False, b":alice!~alice@127.0.0.1 " + offer)
    answer = sends(bob.data_received(True, b"PRIVMSG alice :\x01DCC SEND f.bin 2130706433 6001 5 tk\x01\r\n"), False)
    assert find_offer(transfers, "192.0.2.1", 40030, take=False).context.origin == FROM_SERVER
    alice.data_received(False, b":bob!~bob@127.0.0.1 " + answer)
    o = find_offer(transfers, "192.0.2.1", 40030)
    assert (o.outbound, o.sender, o.context.origin, o.context.connection_id) == (True, "alice", FROM_CLIENT, "c1")
