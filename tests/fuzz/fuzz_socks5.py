"""XEP-0065 SOCKS5 bytestreams: the session on a streamhost connection, seeing the client's handshake itself or
after a carrier did it (the gateway's relay), with the file held both ways."""

from __future__ import annotations

from imguard.protocols.socks5_bytestream import Socks5BytestreamSession
from tests.fuzz.common import CTX, drive, transcript_seeds


def target(data: bytes) -> None:
    from tests.test_socks5_bytestream import HASH, table
    if not data:
        return
    mode, rest = data[0] % 2, data[1:]
    if mode == 0:
        drive(lambda: Socks5BytestreamSession(table(), CTX), rest)
    else:
        def relay():
            s = Socks5BytestreamSession(table(), CTX, stream_hash=HASH, streamhost=("127.0.0.1", 15000))
            s.start()
            return s
        drive(relay, rest)


def seeds() -> list[bytes]:
    legs = transcript_seeds("xmpp/s5b_*.json")
    return [b"\0" + s for s in legs] + [b"\1" + s for s in legs]

