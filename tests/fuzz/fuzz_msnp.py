"""MSNP: the notification-server/switchboard session (messages, MSNFTP invitations, MSNSLP in-band files), the
direct MSNFTP file session, and the MIME, invitation, P2P and SLP parsers alone."""

from __future__ import annotations

from imguard.protocols.msnp import DirectMsnftpSession, MsnpLimits, MsnpSession, find_msnftp_offer
from imguard.protocols.msnp.decoder import (CommandDecoder, P2PError, parse_file_context, parse_invitation,
                                            parse_mime, parse_p2p, parse_slp)
from tests.fuzz.common import CTX, Checker, decode, drive, encode, new_transfers, transcript_seeds

LIMITS = MsnpLimits(msnp_max_held_bytes=1 << 16)


def msnftp() -> DirectMsnftpSession:
    from tests.test_msnp import msnftp_setup        # the invitation a real switchboard session announces
    transfers = new_transfers()
    msnftp_setup(transfers)
    return DirectMsnftpSession(Checker(), transfers, CTX, find_msnftp_offer(transfers, "192.168.1.14", 6891), LIMITS)


def parsers(data: bytes) -> None:
    for cmd in CommandDecoder(LIMITS).feed(data):
        payload = getattr(cmd, "payload", None) or b""
        parse_mime(payload)
        parse_invitation(payload)
        try:
            msg = parse_p2p(payload)
            parse_slp(msg.data)
        except P2PError:
            pass                        # its declared error: the session turns it into an anomaly
    try:
        parse_file_context(data.decode("latin-1"))
    except ValueError:
        pass


def target(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        drive(lambda: MsnpSession(Checker(), new_transfers(), CTX, LIMITS), rest)
    elif mode == 1:
        drive(msnftp, rest)
    else:
        for _, segment in decode(rest):
            parsers(segment)


def seeds() -> list[bytes]:
    sessions = transcript_seeds("legacy/msnms_*.json", "legacy/msnslp_inband.json")
    direct = transcript_seeds("legacy/msnftp_direct.json")
    return ([b"\0" + s for s in sessions] + [b"\1" + s for s in direct]
            + [b"\2" + s for s in sessions] + [b"\2" + encode([(True, b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==")])])

