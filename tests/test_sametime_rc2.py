"""Sametime channels encrypted with RC2 (libmeanwhile's ciphers, imguard/protocols/sametime/cipher.py): RC2 itself
against RFC 2268's test vectors and `cryptography`'s RC2-CBC; the session reading RC2/40 channels (keys: the login
ids on the wire) and, with `sametime_intercept_rc2_128`, RC2/128 ones (the Diffie-Hellman public keys swapped for
the gateway's on each leg), built from libmeanwhile's structures; and Finch itself (libmeanwhile's own ciphers,
which Finch offers on every IM channel) through the real `imguard run` to a scripted server that accepts the cipher
and implements its side of it: a blocked IM never reaches the other side, decrypted or not, the sentinel after it
arrives and decrypts to its exact text, both ways."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import time
import uuid

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import RC2
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from imguard.model import ChatContext
from imguard.protocols.base import Anomaly
from imguard.protocols.sametime import FrameDecoder, SametimeLimits, SametimeSession, build_message
from imguard.protocols.sametime.cipher import (IV, RC2_40, RC2_128, Chain, CipherError, DhKeyPair, decrypt_block,
                                               encrypt_block, expand_key, rc2_40_key)
from imguard.protocols.sametime.decoder import (CHANNEL_ACCEPT, CHANNEL_CREATE, CHANNEL_SEND, ENCRYPT, IM_MESSAGE,
                                                SERVICE_IM, put_opaque, put_string, read_channel_accept,
                                                read_channel_create, read_im, read_send, write_im)
from tests.test_sametime import BLOCKED_WORD, MASK_WORD, Checker, Finch, ScriptedServer, logged_in, login_info, sent

MODE_WHATEVER, MODE_RC2_40, MODE_RC2_128 = 0x0001, 0x1000, 0x2000     # libmeanwhile's mwEncryptPolicy


# --- RC2 ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, key, plaintext, ciphertext", [
    (63, "0000000000000000", "0000000000000000", "ebb773f993278eff"),
    (64, "ffffffffffffffff", "ffffffffffffffff", "278b27e42e2f0d49"),
    (64, "3000000000000000", "1000000000000001", "30649edf9be7d2c2"),
    (64, "88", "0000000000000000", "61a8a244adacccf0"),
    (64, "88bca90e90875a", "0000000000000000", "6ccf4308974c267f"),
    (64, "88bca90e90875a7f0f79c384627bafb2", "0000000000000000", "1a807d272bbe5db1"),
    (128, "88bca90e90875a7f0f79c384627bafb2", "0000000000000000", "2269552ab0f85ca6"),
    (129, "88bca90e90875a7f0f79c384627bafb216f80a6f85920584c42fceb0be255daf1e", "0000000000000000",
     "5b78d3a43dfff1f1")])
def test_rc2_matches_rfc2268_test_vectors(bits, key, plaintext, ciphertext):
    """RFC 2268 section 5's eight vectors, both ways."""
    k = expand_key(bytes.fromhex(key), bits)
    assert encrypt_block(k, bytes.fromhex(plaintext)).hex() == ciphertext
    assert decrypt_block(k, bytes.fromhex(ciphertext)).hex() == plaintext


def test_rc2_cbc_matches_cryptography():
    """A 16-byte key at 128 effective bits (the one form `cryptography`'s RC2 takes): our CBC with PKCS#7-style
    padding is its CBC, message after message on one chain (each message's IV the last block before it)."""
    key = bytes(range(16))
    ours_enc, ours_dec = Chain(expand_key(key, 128)), Chain(expand_key(key, 128))
    iv = IV
    for size in (0, 1, 7, 8, 9, 63, 200):
        data = os.urandom(size)
        pad = padding.PKCS7(64).padder()
        enc = Cipher(RC2(key), modes.CBC(iv)).encryptor()
        theirs = enc.update(pad.update(data) + pad.finalize()) + enc.finalize()
        assert ours_enc.encrypt(data) == theirs, size
        assert ours_dec.decrypt(theirs) == data, size
        iv = theirs[-8:]


def test_a_wrong_key_or_length_does_not_decrypt_and_leaves_the_chain():
    chain = Chain(expand_key(b"alice"))
    ciphertext = Chain(expand_key(b"alice")).encrypt(b"hello, sixteen!!")
    with pytest.raises(CipherError):
        Chain(expand_key(b"mallo")).decrypt(ciphertext)
    with pytest.raises(CipherError):
        chain.decrypt(ciphertext[:-1])
    assert chain.iv == IV and chain.decrypt(ciphertext) == b"hello, sixteen!!"


def test_rc2_40_key_is_the_first_five_bytes_of_the_login_id():
    assert rc2_40_key("alice-login") == expand_key(b"alice")
    assert rc2_40_key("bob") is None and rc2_40_key("dave") == expand_key(b"dave\x00")


# --- the session, from libmeanwhile's structures --------------------------------------------------------------------

def item(cipher: int, info: bytes = b"") -> bytes:
    return struct.pack(">H", cipher) + put_opaque(info)


def create_offered(channel: int, items: list[bytes], target: str = "", creator: str = "") -> bytes:
    """A CHANNEL_CREATE of an IM channel as libmeanwhile writes it: its ciphers offered (mode WHATEVER)."""
    body = struct.pack(">II", 0, channel) + put_string(target) + put_string("") \
        + struct.pack(">IIII", SERVICE_IM, SERVICE_IM, 3, 0) + put_opaque(struct.pack(">II", 1, 1))
    body += b"\x01" + login_info(creator) if creator else b"\x00"
    body += struct.pack(">H", MODE_WHATEVER) + put_opaque(struct.pack(">I", len(items)) + b"".join(items)
                                                           + struct.pack(">HB", MODE_WHATEVER, 0))
    return build_message(CHANNEL_CREATE, 0, body + struct.pack(">IIH", 0, 0, 7))


def accepted(channel: int, cipher_item: bytes, mode: int, acceptor: str = "") -> bytes:
    body = struct.pack(">IIII", SERVICE_IM, SERVICE_IM, 3, 0)
    body += b"\x01" + login_info(acceptor) if acceptor else b"\x00"
    body += struct.pack(">H", mode) + put_opaque(cipher_item + struct.pack(">HB", MODE_WHATEVER, 0))
    return build_message(CHANNEL_ACCEPT, channel, body + struct.pack(">IIH", 0, 0, 7))


def im(channel: int, chain: Chain, text: str) -> bytes:
    return build_message(CHANNEL_SEND, channel, struct.pack(">H", IM_MESSAGE)
                         + put_opaque(chain.encrypt(write_im("text", text))), ENCRYPT)


def texts(data: bytes, chain: Chain | None) -> list[str]:
    """The IM texts in `data`, decrypted on `chain` where encrypted (as the receiving libmeanwhile would)."""
    out = []
    for m in FrameDecoder().feed(data):
        if isinstance(m, bytes) or m.type != CHANNEL_SEND:
            continue
        send_type, payload = read_send(m.body)
        out.append(read_im(chain.decrypt(payload) if m.encrypted else payload).text)
    return out


def test_rc2_40_outbound_read_blocked_masked_and_resynchronised():
    """alice's channel to bob, RC2/40 accepted: her IMs (encrypted with her login id's key) reach policy as text;
    an allowed one crosses as its own bytes; a blocked one is dropped (Finch told); the next is re-encrypted on
    the chain bob's side holds, so bob's client decrypts it to the exact text; a masked one likewise."""
    checker = Checker()
    alice = Chain(rc2_40_key("alice-login"))
    first = im(4, alice, "hello bob")
    segments = logged_in() + [
        (True, create_offered(4, [item(RC2_40), item(RC2_128, DhKeyPair().public_bytes())], target="bob")),
        (False, accepted(4, item(RC2_40), MODE_RC2_40, acceptor="bob")),
        (True, first),
        (True, im(4, alice, f"the {BLOCKED_WORD} plan")),
        (True, im(4, alice, "sentinel after the block")),
        (True, im(4, alice, f"code {MASK_WORD} here"))]
    session = SametimeSession(checker, None, ChatContext())
    out = [c for from_client, data in segments for c in session.data_received(from_client, data)]
    assert [t for t, *_ in checker.asked] == ["hello bob", f"the {BLOCKED_WORD} plan", "sentinel after the block",
                                              f"code {MASK_WORD} here"]
    to_server = sent(out, False)
    assert first in to_server
    bob = Chain(rc2_40_key("alice-login"))     # bob's client decrypts alice's messages with her login id's key
    assert texts(to_server, bob) == ["hello bob", "sentinel after the block", "code [MASKED] here"]
    assert [t.startswith("[imguard] Your message to bob was blocked") for t in texts(sent(out, True), None)] == [True]
    assert not [a for a in out if isinstance(a, Anomaly)]


def test_rc2_40_inbound_from_the_creators_login_id():
    """bob opens a channel to alice offering RC2/40, alice accepts it: bob's IMs (his login id's key, from the
    create's creator) are read; the blocked one is dropped, the sentinel after it decrypts on alice's chain."""
    checker = Checker()
    bob = Chain(rc2_40_key("bob-login"))
    segments = logged_in() + [
        (False, create_offered(0x80000001, [item(RC2_40)], target="alice", creator="bob")),
        (True, accepted(0x80000001, item(RC2_40), MODE_RC2_40)),
        (False, im(0x80000001, bob, f"the {BLOCKED_WORD} launch")),
        (False, im(0x80000001, bob, "sentinel in"))]
    session = SametimeSession(checker, None, ChatContext())
    out = [c for from_client, data in segments for c in session.data_received(from_client, data)]
    assert [(t, o, s) for t, o, s, _ in checker.asked] == [(f"the {BLOCKED_WORD} launch", "server", "bob"),
                                                           ("sentinel in", "server", "bob")]
    alice = Chain(rc2_40_key("bob-login"))
    got = texts(sent(out, True), alice)
    assert got[0].startswith("[imguard] A message from bob was blocked") and got[1:] == ["sentinel in"]


def test_an_encrypted_channel_whose_accept_was_not_seen_stays_unread():
    """Keys unknown (no accept seen): the `encrypted_channel` anomaly, policy asked on empty text."""
    checker = Checker()
    segments = logged_in() + [(True, create_offered(4, [item(RC2_40)], target="bob")),
                              (True, im(4, Chain(rc2_40_key("alice-login")), "unseen"))]
    session = SametimeSession(checker, None, ChatContext())
    out = [c for from_client, data in segments for c in session.data_received(from_client, data)]
    assert [a.kind for a in out if isinstance(a, Anomaly)] == ["encrypted_channel"]
    assert checker.asked == [("", "client", "alice", ("bob",))]


def test_an_encrypt_block_that_does_not_fit_keeps_the_channel_followed():
    """A create whose encrypt block claims more than it has: the channel is still followed (its plain IMs decided,
    its encrypted ones an anomaly, decided unread), never a crash."""
    checker = Checker()
    body = read_channel_create(create_offered(4, [item(RC2_40)], target="bob")[12:])
    bad = create_offered(4, [item(RC2_40)], target="bob")
    cut = bad[:-(len(bad) - 12 - body.encrypt.length_at - 4)]           # the block's length, nothing after it
    cut = struct.pack(">I", len(cut) - 4) + cut[4:]
    segments = logged_in() + [(True, cut), (True, im(4, Chain(rc2_40_key("alice-login")), "x")),
                              (True, build_message(CHANNEL_SEND, 4, struct.pack(">H", IM_MESSAGE)
                                                   + put_opaque(write_im("text", "plain one"))))]
    session = SametimeSession(checker, None, ChatContext())
    out = [c for from_client, data in segments for c in session.data_received(from_client, data)]
    assert read_channel_create(cut[12:]).encrypt.items == ()
    assert [a.kind for a in out if isinstance(a, Anomaly)] == ["encrypted_channel"]
    assert [t for t, *_ in checker.asked] == ["", "plain one"]


def test_a_degenerate_public_key_gives_no_key():
    assert DhKeyPair().key_with(b"\x01") is None and DhKeyPair().key_with(b"") is None
    assert len(DhKeyPair().public_bytes()) == 64


def rc2_128_world(intercept: bool):
    """alice creates a channel offering RC2/128 with her public key; bob accepts with his: what each side sees."""
    alice_dh, bob_dh = DhKeyPair(), DhKeyPair()
    limits = SametimeLimits(sametime_intercept_rc2_128=intercept)
    session = SametimeSession(Checker(), None, ChatContext(), limits)
    for from_client, data in logged_in():
        session.data_received(from_client, data)
    create = create_offered(4, [item(RC2_40), item(RC2_128, alice_dh.public_bytes())], target="bob")
    [fwd_create] = session.data_received(True, create)
    accept = accepted(4, item(RC2_128, bob_dh.public_bytes()), MODE_RC2_128, acceptor="bob")
    [fwd_accept] = session.data_received(False, accept)
    seen_by_bob = read_channel_create(fwd_create.data[4:][8:]).encrypt.item(RC2_128).info
    seen_by_alice = read_channel_accept(fwd_accept.data[4:][8:])[2].items[0].info
    return session, (create, fwd_create.data, alice_dh.key_with(seen_by_alice)), \
        (accept, fwd_accept.data, bob_dh.key_with(seen_by_bob))


def test_rc2_128_is_left_to_its_parties_by_default():
    """Without sametime_intercept_rc2_128 the create and accept cross unchanged and the channel is not read."""
    session, (create, fwd_create, _), (accept, fwd_accept, _) = rc2_128_world(False)
    assert (fwd_create, fwd_accept) == (create, accept)
    out = session.data_received(True, im(4, Chain(expand_key(b"x" * 16)), "secret"))
    assert [a.kind for a in out if isinstance(a, Anomaly)] == ["encrypted_channel"]


def test_rc2_128_intercepted_each_leg_its_own_key():
    """With sametime_intercept_rc2_128 each side gets the gateway's public key (the offer's and the accept's
    lengths kept well-formed); what alice sends is read on her leg's key and re-encrypted on bob's, both ways; a
    blocked message reaches neither key."""
    session, (_, fwd_create, alice_key), (_, fwd_accept, bob_key) = rc2_128_world(True)
    assert alice_key != bob_key
    alice_out, bob_in, bob_out, alice_in = Chain(alice_key), Chain(bob_key), Chain(bob_key), Chain(alice_key)
    out = session.data_received(True, im(4, alice_out, f"the {BLOCKED_WORD} plan"))
    out += session.data_received(True, im(4, alice_out, "sentinel out"))
    out += session.data_received(False, im(4, bob_out, "reply in"))
    assert texts(sent(out, False), bob_in) == ["sentinel out"]
    got = texts(sent(out, True), alice_in)
    assert got[0].startswith("[imguard] Your message to bob was blocked") and got[1:] == ["reply in"]
    assert [t for t, *_ in session.checker.asked] == [f"the {BLOCKED_WORD} plan", "sentinel out", "reply in"]


@pytest.mark.parametrize("chunk", [1, 5])
def test_the_same_texts_at_every_split(chunk):
    """The RC2/40 outbound conversation fed a few bytes at a time: the same decisions, the same bytes out."""
    alice = Chain(rc2_40_key("alice-login"))
    segments = logged_in() + [(True, create_offered(4, [item(RC2_40)], target="bob")),
                              (False, accepted(4, item(RC2_40), MODE_RC2_40, acceptor="bob")),
                              (True, im(4, alice, f"the {BLOCKED_WORD} plan")), (True, im(4, alice, "after"))]
    outs = []
    for size in (0, chunk):
        checker = Checker()
        session = SametimeSession(checker, None, ChatContext())
        out = []
        for from_client, data in segments:
            for i in range(0, len(data), size or len(data)):
                out += session.data_received(from_client, data[i:i + (size or len(data))])
        outs.append((checker.asked, sent(out, False)))
    assert outs[0] == outs[1]


# --- Finch through the gateway ----------------------------------------------------------------------------------------

class CipherServer(ScriptedServer):
    """The scripted server as bob's client with libmeanwhile's cipher: it accepts alice's channels with `cipher`
    (RC2/40, or RC2/128 with its own Diffie-Hellman key), decrypts what she sends on them (`plain`: the texts, in
    order), and bob's channel to alice offers only that cipher, his IMs encrypted once Finch accepts it."""

    def __init__(self, cipher: int):
        super().__init__()
        self.cipher = cipher
        self.dh = DhKeyPair()
        self.client_offers: dict[int, object] = {}
        self.chains: dict[int, Chain] = {}          # channel -> what decrypts alice's messages on it
        self.plain: list[str] = []                  # alice's IM texts, decrypted
        self.clear: list[str] = []                  # alice's IM texts sent without encryption
        self.bob_chain: Chain | None = None
        self.errors: list[str] = []

    def _key(self, their_public: bytes) -> tuple[int, ...]:
        if self.cipher == RC2_40:
            return rc2_40_key("alice-login")        # alice's login id, as the server's LOGIN_ACK gave it
        return self.dh.key_with(their_public)

    def on_message(self, type_: int, channel: int, message: bytes) -> None:
        try:
            body = message[8:]
            if type_ == CHANNEL_CREATE:
                create = read_channel_create(body)
                self.client_offers[create.channel] = create.encrypt
            elif type_ == CHANNEL_ACCEPT and channel == self.BOB:
                chosen = read_channel_accept(body)[2].items[0]
                key = rc2_40_key("bob-login") if self.cipher == RC2_40 else self.dh.key_with(chosen.info)
                self.chains[channel] = Chain(self._key(chosen.info))
                self.bob_chain = Chain(key)
            elif type_ == CHANNEL_SEND:
                options = struct.unpack(">H", message[2:4])[0]
                send_type, data = read_send(body)
                if send_type != IM_MESSAGE:
                    return
                if options & ENCRYPT:
                    text = read_im(self.chains[channel].decrypt(data))
                    if text is not None:
                        self.plain.append(text.text)
                elif (text := read_im(data)) is not None:
                    self.clear.append(text.text)
        except Exception as e:      # noqa: BLE001 - reported by the test, not lost in the server's thread
            self.errors.append(repr(e))

    def accept_encrypt(self, channel: int, service: int) -> bytes:
        offer = self.client_offers.get(channel)
        if service != SERVICE_IM or offer is None or offer.item(self.cipher) is None:
            return super().accept_encrypt(channel, service)
        info = b"" if self.cipher == RC2_40 else self.dh.public_bytes()
        self.chains[channel] = Chain(self._key(offer.item(self.cipher).info))
        mode = MODE_RC2_40 if self.cipher == RC2_40 else MODE_RC2_128
        return b"\x01" + login_info("bob") + struct.pack(">H", mode) \
            + put_opaque(item(self.cipher, info) + struct.pack(">HB", MODE_WHATEVER, 0))

    def bob_says(self, *texts: str) -> None:
        async def play():
            if self.bob_chain is None:
                info = b"" if self.cipher == RC2_40 else self.dh.public_bytes()
                self.writer.write(create_offered(self.BOB, [item(self.cipher, info)], target="alice",
                                                 creator="bob"))
                await self.writer.drain()
                for _ in range(100):
                    if self.bob_chain is not None:
                        break
                    await asyncio.sleep(0.1)
                assert self.bob_chain is not None, "Finch did not accept bob's channel"
            for text in texts:
                self.writer.write(im(self.BOB, self.bob_chain, text))
            await self.writer.drain()
        asyncio.run_coroutine_threadsafe(play(), self.loop).result(20)


@pytest.fixture
def cipher_world(tmp_path, request):
    for tool in ("finch", "tmux"):
        if shutil.which(tool) is None:
            if os.environ.get("CI"):
                pytest.fail(f"{tool} is not installed (Debian: finch, tmux), and CI is set")
            pytest.skip(f"{tool} is not installed (Debian: finch, tmux)")
    from tests.peers.http_gateway import HttpGateway
    cipher = request.param
    server = CipherServer(cipher)
    server.start()
    flags = []      # RC2/128 is intercepted by default (sametime_intercept_rc2_128)
    gw = HttpGateway.start(tmp_path / "gw", [f"tcp://127.0.0.1:{server.port}"],
                           extra=["--ports", f"{server.port}=sametime", *flags])
    finch = Finch(tmp_path / "finch-home", gw.ports[0])
    try:
        yield server, gw, finch
    finally:
        finch.stop()
        gw.stop()
        server.loop.call_soon_threadsafe(server.loop.stop)


@pytest.mark.parametrize("cipher_world", [RC2_40, RC2_128], ids=["rc2-40", "rc2-128"], indirect=True)
def test_finch_encrypted_channels_through_the_gateway_both_ways(cipher_world):
    """Finch (libmeanwhile's own cipher code) logs in as alice through `imguard run`. Inbound: bob's channel is
    accepted with the cipher, his blocked IM never shows in Finch (the notice does) and his encrypted sentinel
    after it does, so Finch's libmeanwhile decrypted what the gateway re-encrypted. Outbound: alice's channel to
    bob is accepted with the cipher; her blocked IM reaches bob neither as text nor encrypted (no message decrypts
    to it), Finch shows the rule's notice, and her sentinel, encrypted, decrypts on bob's side to its exact text.
    The alerts name alice and bob and the direction. tshark's `sametime` dissector on the capture finds the IMs
    encrypted on both legs; `imguard pcap` of an RC2/40 run gives the gateway's decisions (an RC2/128 one cannot:
    the gateway's keys are its own)."""
    from tests.peers.capture import Capture
    from tests.test_inline_offline import assert_same, decisions, needs_tcpdump, replay_both_legs, settled
    needs_tcpdump()
    server, gw, finch = cipher_world
    offset = gw.log_size()
    tag = uuid.uuid4().hex[:6]
    since = gw.mark()
    capture = Capture.start(gw.directory / "sametime.pcap", f"tcp port {gw.ports[0]} or tcp port {server.port}")
    try:
        run_both_ways(server, finch, tag)
    finally:
        capture.stop()
    events = [e for e in settled(gw.alerts)[since:] if tag in json.dumps(e)]
    blocks = {e["imguard"]["context"]["direction"]: e["imguard"]["context"] for e in events
              if e["event"]["action"] == "block"}
    assert blocks["inbound"]["sender"] == "bob" and blocks["inbound"]["recipients"] == ["alice"]
    assert blocks["outbound"]["sender"] == "alice" and blocks["outbound"]["recipients"] == ["bob"]
    assert "encrypted_channel" not in json.dumps(settled(gw.alerts)[since:])      # every channel was read
    assert not gw.errors_since(offset), "imguard logged errors:\n" + "\n".join(gw.errors_since(offset))
    for port in (gw.ports[0], server.port):
        assert encrypted_ims(capture, gw.directory, port) >= 2, port
    if server.cipher == RC2_40:
        ports = [f"{gw.ports[0]}=sametime", f"{server.port}=sametime"]
        offline = replay_both_legs(capture, gw.directory, [gw.ports[0]], [server.port], ports,
                                   gw.directory / "rules")
        assert_same(decisions(events), offline, "Sametime RC2/40")


def encrypted_ims(capture, workdir, port: int) -> int:
    """tshark's count of CHANNEL_SENDs with the ENCRYPT option on the leg of `port`."""
    from tests.test_tshark_crosscheck import tshark
    if shutil.which("tshark") is None:
        if os.environ.get("CI"):
            pytest.fail("tshark is not installed, and CI is set")
        pytest.skip("tshark is not installed")
    pcap = capture.select(workdir / f"leg-{port}.pcap", f"tcp port {port}")
    frames = tshark(pcap, f"tcp.port=={port},sametime", layer="sametime")
    kinds = [(int(t, 16), e) for f in frames
             for t, e in zip(f.values("sametime.message_type"), f.values("sametime.message_options.encrypted"),
                             strict=True)]
    return sum(1 for t, e in kinds if t == CHANNEL_SEND and e not in ("0", "False", "false"))


def run_both_ways(server: CipherServer, finch: Finch, tag: str) -> None:
    finch.start()
    assert server.logged_in.wait(20), finch.screen()
    time.sleep(1)
    server.bob_says(f"the {BLOCKED_WORD} launch {tag}", f"sentinel in {tag}")
    assert finch.wait_screen(f"sentinel in {tag}"[-12:]), finch.screen()
    screen = finch.screen()
    assert BLOCKED_WORD not in screen and "A message from bob was blocked" in screen, screen
    finch.say(f"the {BLOCKED_WORD} plan {tag}")
    assert finch.wait_screen("confidential"), finch.screen()       # the rule's notice
    finch.say(f"sentinel out {tag}")
    deadline = time.monotonic() + 15
    while f"sentinel out {tag}" not in server.plain and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not server.errors, server.errors
    assert f"sentinel out {tag}" in server.plain, (server.plain, server.clear)
    assert not server.clear and not [t for t in server.plain if BLOCKED_WORD in t]
    assert BLOCKED_WORD.encode() not in server.received
