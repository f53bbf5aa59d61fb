"""MSNP (MSN Messenger, TCP 1863): sans-io, standard library only.

- decoder: CommandDecoder (bytes -> Command/FramingError, byte-exact), MIME, MSNSLP/P2P and MSNFTP
  invitation parsing, MsnpLimits
- session: MsnpSession, the client<->server StreamSession (NS or switchboard: identity, message policy,
  MSNFTP invitations registered as MsnftpOffer (ExpectedTransfers kind "msnftp", key (ip, port)),
  MSNSLP in-band files held until the verdict)
- msnftp: DirectMsnftpSession (the MSNFTP data connection held until inspection), find_msnftp_offer
"""

from imguard.protocols.msnp.decoder import (FT_GUID, Command, CommandDecoder, FramingError, MsnpLimits, P2PHeader,
                                            build_file_context, build_p2p, format_command, parse_file_context,
                                            parse_invitation, parse_mime, parse_p2p, parse_slp)
from imguard.protocols.msnp.msnftp import DirectMsnftpSession, find_msnftp_offer
from imguard.protocols.msnp.session import MSNFTP_KIND, MsnftpOffer, MsnpSession

__all__ = ["FT_GUID", "Command", "CommandDecoder", "DirectMsnftpSession", "FramingError", "MSNFTP_KIND",
           "MsnftpOffer", "MsnpLimits", "MsnpSession", "P2PHeader", "build_file_context", "build_p2p",
           "find_msnftp_offer", "format_command", "parse_file_context", "parse_invitation", "parse_mime",
           "parse_p2p", "parse_slp"]
