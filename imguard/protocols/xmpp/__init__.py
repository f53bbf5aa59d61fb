"""XMPP (RFC 6120/6121) for imguard: a byte-exact stream framer and the c2s session logic.

    decoder.XmlStreamDecoder   bytes in, events out (StreamOpened, Stanza, Whitespace, StreamClosed, XmlError)
    session.XmppSession        the StreamSession for one client-to-server connection
"""

from imguard.protocols.xmpp.decoder import XmlStreamDecoder, XmppLimits
from imguard.protocols.xmpp.session import XmppSession, socks5_hash

__all__ = ["XmlStreamDecoder", "XmppLimits", "XmppSession", "socks5_hash"]
