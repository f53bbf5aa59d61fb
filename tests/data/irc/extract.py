"""Regenerate the IRC transcripts in this folder from the captures (needs tshark; not run by tests).

    python tests/data/irc/extract.py [tests/data/captures]

Same format as tests/data/xmpp/*.json: each segment is one TCP payload, ["c", text] from the client
(the side that opened the connection) or ["s", text] from the server, text = the bytes as latin-1.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
PCAPS = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent / "captures"
sys.path.insert(0, str(HERE.parent))

from tshark_follow import segments  # noqa: E402

# (output, capture, tcp.stream, note, max segments or None)
TRANSCRIPTS = [
    ("zeek_irc_basic.json", "zeek/irc-basic.pcap", 0,
     "zeek/zeek testing/btest/Traces/irc-basic.pcap (BSD-3): USER/NICK, freenode welcome, JOIN, "
     "PRIVMSG #brotest test, QUIT", None),
    ("zeek_irc_more_commands_0.json", "zeek/irc-more-commands.pcap", 0,
     "zeek/zeek testing/btest/Traces/irc-more-commands.pcap (BSD-3), first connection: CAP LS/REQ/ACK/END, PASS, "
     "NICK tim, InspIRCd-3", None),
    ("zeek_irc_more_commands_1.json", "zeek/irc-more-commands.pcap", 1,
     "zeek/zeek irc-more-commands.pcap, second connection: 433 nick in use, NICK tim_ before registration", None),
    ("zeek_irc_dcc_send_control.json", "zeek/irc-dcc-send.pcapng", 0,
     "zeek/zeek testing/btest/Traces/irc-dcc-send.pcapng (BSD-3), the IRC connection 10.0.0.7:59069 -> 10.0.0.22:6667: "
     "CAP LS 302 with tags, channel PRIVMSGs, PRIVMSG tim1 :\\x01DCC SEND ssh.trace 167772167 59130 1320211\\x01, "
     "DCC CHAT offer", None),
    ("zeek_irc_dcc_chat.json", "zeek/irc-dcc-send.pcapng", 2,
     "zeek/zeek irc-dcc-send.pcapng, the DCC CHAT connection 10.0.0.22:38016 -> 10.0.0.7:59214", None),
    ("zeek_irc_starttls_plain.json", "zeek/irc-starttls.pcap", 0,
     "zeek/zeek testing/btest/Traces/tls/irc-starttls.pcap (BSD-3): the plaintext part only (STARTTLS, 670); "
     "TLS follows", 2),
    ("zeek_irc_dcc_first_command.json", "zeek/irc-dcc-first-command.pcap", 0,
     "zeek/zeek testing/btest/Traces/irc-dcc-first-command.pcap (BSD-3, scapy-generated): "
     "DCC SEND as the first line", None),
    ("ngircd_dcc_alice.json", "generated/irc_dcc_send.pcap", 0,
     "generated/irc_dcc_send.pcap (ngircd 26.1 + irc 20.5.0 on loopback): alice, JOIN, PRIVMSG #imguard, "
     "DCC SEND eicar.com 2130706433 16800 6800 to bob", None),
    ("ngircd_dcc_bob.json", "generated/irc_dcc_send.pcap", 1,
     "generated/irc_dcc_send.pcap: bob, receives alice's channel message and DCC offer", None),
    ("ndpi_irc.json", "ndpi/irc.pcap", 0,
     "ntop/nDPI tests/cfgs/default/pcap/irc.pcap (LGPL-3): registration against freenode on port 8000", None),
]


def main() -> None:
    for name, capture, stream, note, limit in TRANSCRIPTS:
        segs = segments(PCAPS / capture, stream)
        if limit:
            segs = segs[:limit]
        doc = {"source": f"{capture} tcp.stream eq {stream}", "note": note,
               "encoding": "each segment is one TCP payload; text is the bytes decoded as latin-1",
               "segments": segs}
        (HERE / name).write_text(json.dumps(doc, indent=0, ensure_ascii=True) + "\n")
        print(name, len(segs), "segments", sum(len(s[1]) for s in segs), "bytes")


if __name__ == "__main__":
    main()
