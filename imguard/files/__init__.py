"""Protocol-agnostic file-transfer bookkeeping (Zeek's files framework, in miniature).

`expected.ExpectedTransfers` remembers transfers announced on a control channel (an XMPP upload
slot, a SOCKS5 bytestream offer, an IRC DCC SEND) until the data connection or request shows up.
"""

from imguard.files.expected import (ExpectedBytestream, ExpectedTransfers, ExpectedUpload, StreamHost,
                                    TransferSettings, normalize_url)

__all__ = ["ExpectedBytestream", "ExpectedTransfers", "ExpectedUpload", "StreamHost", "TransferSettings",
           "normalize_url"]
