"""YMSG (Yahoo! Messenger, TCP 5050): sans-io, standard library only.

- decoder: PacketDecoder (bytes -> Packet/FramingError, byte-exact), key/value fields, build/rebuild,
  Yahoo markup stripping, parse_notifyft (the YMSG <= 11 HTTP upload body), YmsgLimits
- session: YmsgSession, the client<->server StreamSession (identity, message policy, file transfers
  registered for the HTTP side: kinds "upload", "ymsg_relay", "ymsg_p2p", "ymsg_url"), find_ymsg_transfer
"""

from imguard.protocols.ymsg.decoder import (MESSAGE, Packet, PacketDecoder, FramingError, YmsgLimits, build_packet,
                                            parse_notifyft, strip_markup)
from imguard.protocols.ymsg.session import (P2P_KIND, RELAY_KIND, URL_KIND, YmsgSession, YmsgTransfer,
                                            find_ymsg_transfer)

__all__ = ["FramingError", "MESSAGE", "P2P_KIND", "Packet", "PacketDecoder", "RELAY_KIND", "URL_KIND", "YmsgLimits",
           "YmsgSession", "YmsgTransfer", "build_packet", "find_ymsg_transfer", "parse_notifyft", "strip_markup"]
