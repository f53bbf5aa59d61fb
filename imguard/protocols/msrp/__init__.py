"""MSRP (RFC 4975) with RFC 5547 file transfer: sans-io, standard library only.

- framing: MsrpDecoder (bytes -> MsrpChunk, byte-exact), MsrpLimits, response/REPORT/SEND builders
- offer: MsrpOffer (the ExpectedTransfers entry, kind "msrp", keys path_key(uri) and (host, port)),
  find_msrp_offer / find_msrp_offer_by_uri for the carrier
- session: MsrpSession, the StreamSession of one MSRP connection (text policy, files held until the verdict)
"""

from imguard.protocols.msrp.framing import MsrpChunk, MsrpDecoder, MsrpFramingError, MsrpLimits, parse_byte_range
from imguard.protocols.msrp.offer import (MSRP_KIND, FileSelector, MsrpOffer, MsrpUri, find_msrp_offer,
                                          find_msrp_offer_by_uri, parse_msrp_uri, path_key, remember_msrp_offer)
from imguard.protocols.msrp.session import MsrpSession

__all__ = ["FileSelector", "MSRP_KIND", "MsrpChunk", "MsrpDecoder", "MsrpFramingError", "MsrpLimits", "MsrpOffer",
           "MsrpSession", "MsrpUri", "find_msrp_offer", "find_msrp_offer_by_uri", "parse_byte_range",
           "parse_msrp_uri", "path_key", "remember_msrp_offer"]
