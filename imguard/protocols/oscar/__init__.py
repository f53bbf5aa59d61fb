"""OSCAR (AIM/ICQ, TCP 5190): sans-io, standard library only.

- decoder: FlapDecoder (bytes -> Flap/FramingError, byte-exact), SNAC/TLV/ICBM/rendezvous parsing and
  building, the OFT header, OscarLimits
- session: OscarSession, the client<->server StreamSession (login and BOS: identity, ICBM message policy,
  SendFile rendezvous registered as OftOffer: ExpectedTransfers kind "oft", keys cookie hex and (ip, port))
- oft: OftSession (the OFT connection held until inspection), find_oft_offer
"""

from imguard.protocols.oscar.decoder import (CAP_SENDFILE, Flap, FlapDecoder, FramingError, OscarLimits,
                                             build_flap, build_oft, build_rendezvous, build_snac,
                                             build_text_fragments, build_tlvs, oft_checksum, parse_icbm,
                                             parse_oft, parse_snac, parse_tlvs, strip_html)
from imguard.protocols.oscar.oft import OftSession
from imguard.protocols.oscar.session import COOKIE_KIND, OFT_KIND, OftOffer, OscarSession, find_oft_offer

__all__ = ["CAP_SENDFILE", "COOKIE_KIND", "Flap", "FlapDecoder", "FramingError", "OFT_KIND", "OftOffer",
           "OftSession", "OscarLimits", "OscarSession", "build_flap", "build_oft", "build_rendezvous", "build_snac",
           "build_text_fragments", "build_tlvs", "find_oft_offer", "oft_checksum", "parse_icbm", "parse_oft",
           "parse_snac", "parse_tlvs", "strip_html"]
