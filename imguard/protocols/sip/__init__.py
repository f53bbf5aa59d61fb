"""SIP (RFC 3261) for instant messaging: RFC 3428 MESSAGE and INVITE/SDP MSRP offers. Sans-io, stdlib only.

- message: SipStreamDecoder / parse_datagram (bytes -> SipMessage, byte-exact), SipLimits, build_response
- sdp: msrp_media (the m=message MSRP streams of an SDP, RFC 5547 file-selector)
- session: SipSession (TCP/TLS StreamSession), SipDatagramHandler (UDP, one datagram at a time)
"""

from imguard.protocols.sip.message import (KeepAlive, SipFramingError, SipLimits, SipMessage, SipStreamDecoder,
                                           build_response, parse_datagram, uri_of)
from imguard.protocols.sip.sdp import MsrpMedia, SdpError, msrp_media, parse_file_selector
from imguard.protocols.sip.session import SipDatagramHandler, SipSession

__all__ = ["KeepAlive", "MsrpMedia", "SdpError", "SipDatagramHandler", "SipFramingError", "SipLimits", "SipMessage",
           "SipSession", "SipStreamDecoder", "build_response", "msrp_media", "parse_datagram",
           "parse_file_selector", "uri_of"]
