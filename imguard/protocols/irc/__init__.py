"""IRC (RFC 1459/2812, IRCv3 tags, CAP, SASL, STARTTLS) with CTCP and DCC: sans-io, standard library only.

- decoder: LineDecoder (bytes -> Message/BadLine, byte-exact), split_ctcp, parse_dcc, IrcLimits
- session: IrcSession, the client<->server StreamSession (identity, message policy, DCC offers)
- dcc: DccOffer (the ExpectedTransfers entry, kind "dcc", key (host, port)), DccSendSession (the data
  connection held until inspection), DccChatSession (DCC CHAT lines checked like messages),
  dcc_session / find_offer for the carrier
"""

from imguard.protocols.irc.dcc import DCC_KIND, DccChatSession, DccOffer, DccSendSession, dcc_session, find_offer
from imguard.protocols.irc.decoder import (BadLine, Ctcp, DccChat, DccError, DccResume, DccSend, IrcLimits,
                                           LineDecoder, LineTooLong, Message, parse_dcc, parse_line, split_ctcp)
from imguard.protocols.irc.session import DccRelay, IrcSession

__all__ = ["BadLine", "Ctcp", "DCC_KIND", "DccChat", "DccChatSession", "DccError", "DccOffer", "DccRelay",
           "DccResume", "DccSend", "DccSendSession", "IrcLimits", "IrcSession", "LineDecoder", "LineTooLong",
           "Message", "dcc_session", "find_offer", "parse_dcc", "parse_line", "split_ctcp"]
