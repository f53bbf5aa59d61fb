"""Protocol detection: pure, by destination port and by the client's first bytes."""

import pytest

from imguard.protocols.detect import (HTTP, IRC, NEED_MORE, SOCKS5, TLS, UNKNOWN, XMPP, detect, parse_port_map,
                                    sniff)

PORTS = parse_port_map(["5222=xmpp", "5223=xmpp+tls", "6667=irc", "6697=irc+tls"])
CLIENT_HELLO = bytes.fromhex("160301020001") + b"\x00" * 40


def test_port_map_parsing():
    """PORT=PROTO, '+tls' marks TLS-first; malformed entries are refused with the entry named."""
    assert PORTS[5222] == ("xmpp", False) and PORTS[5223] == ("xmpp", True)
    with pytest.raises(ValueError, match="xmpp5222"):
        parse_port_map(["xmpp5222"])


def test_mapped_port_plaintext():
    """A plaintext client on 5222 is XMPP, whatever its first bytes."""
    d = detect(5222, b"<?xml version='1.0'?><stream:stream", b"", PORTS)
    assert (d.protocol, d.tls_first) == (XMPP, False)
    assert detect(5222, b"garbage", b"", PORTS).protocol == XMPP


def test_mapped_port_clienthello_means_tls_first():
    """A ClientHello on 5222 (XEP-0368 direct TLS) or 5223 is TLS-first XMPP."""
    assert detect(5222, CLIENT_HELLO, b"", PORTS) .tls_first is True
    d = detect(5223, CLIENT_HELLO, b"", PORTS)
    assert (d.protocol, d.tls_first) == (XMPP, True)


def test_mapped_port_waits_for_client_bytes():
    """Nothing yet: wait (a partial TLS record header too)."""
    assert detect(5222, b"", b"", PORTS) is NEED_MORE
    assert detect(5223, b"\x16", b"", PORTS) is NEED_MORE


def test_server_first_on_mapped_port():
    """An IRC server greeting on 6667 decides before the client speaks."""
    d = detect(6667, b"", b":irc.example NOTICE * :*** Looking up your hostname\r\n", PORTS)
    assert d.protocol == IRC


@pytest.mark.parametrize("data,expected", [
    (b"<?xml version='1.0'?>", XMPP),
    (b"<stream:stream to='example.com'", XMPP),
    (b"\xef\xbb\xbf<?xml ", XMPP),
    (b"NICK alice\r\nUSER a 0 * :A\r\n", IRC),
    (b"CAP LS 302\r\n", IRC),
    (b"PASS secret\r\n", IRC),
    (b"PUT /upload/abc/file.png HTTP/1.1\r\nHost: x\r\n", HTTP),
    (b"\x05\x01\x00", SOCKS5),
    (CLIENT_HELLO, TLS),
    (b"SSH-2.0-OpenSSH_9.2\r\n", UNKNOWN),
])
def test_unknown_port_first_bytes(data, expected):
    """On an unmapped port the first bytes decide."""
    d = detect(7777, data, b"", PORTS)
    assert d.protocol == expected


@pytest.mark.parametrize("prefix", [b"<", b"<?x", b"<stream:st", b"NIC", b"PU", b"PUT /x", b"\x16\x03"])
def test_partial_openers_wait(prefix):
    """A prefix of a known opener waits for more bytes instead of guessing."""
    assert sniff(prefix) is NEED_MORE
    assert detect(7777, prefix, b"", PORTS) is NEED_MORE


def test_server_first_unknown_port_is_relayed():
    """A server greeting on an unknown port with nothing from the client: unknown (relayed untouched)."""
    assert detect(2525, b"", b"220 mail ESMTP\r\n", PORTS).protocol == UNKNOWN


def test_every_split_of_an_opener_gives_the_same_answer():
    """Fed byte by byte, detection either waits or reaches the same answer as with the whole opener."""
    opener = b"<?xml version='1.0'?><stream:stream to='a'>"
    answers = {detect(7777, opener[:i], b"", PORTS) for i in range(1, len(opener) + 1)}
    answers.discard(NEED_MORE)
    assert {a.protocol for a in answers} == {XMPP}
