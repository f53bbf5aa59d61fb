"""Lotus Sametime (the Sametime Community protocol, "VP", TCP 1533): sans-io, standard library only.

- decoder: FrameDecoder (bytes -> Message / FramingError / keepalive bytes, byte-exact), the meanwhile
  structures (login, channel create/accept/send, IM and conference data), SametimeLimits
- session: SametimeSession, the client<->server StreamSession (identity, IM and conference messages to policy, file
  transfers held through imguard.files.tracker)
"""

from imguard.protocols.sametime.decoder import FrameDecoder, FramingError, Message, SametimeLimits, build_message
from imguard.protocols.sametime.session import SametimeSession

__all__ = ["FrameDecoder", "FramingError", "Message", "SametimeLimits", "SametimeSession", "build_message"]
