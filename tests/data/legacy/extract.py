"""Regenerate the MSN transcripts in this folder from the capture (needs tshark; not run by tests).

    python tests/data/legacy/extract.py [tests/data/captures]

Same format as tests/data/irc/*.json and tests/data/xmpp/*.json: each segment is one TCP payload,
["c", text] from the client (the side that opened the connection) or ["s", text] from the server,
text = the bytes as latin-1. Segment boundaries are the capture's own.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
PCAPS = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parent / "captures"
sys.path.insert(0, str(HERE.parent))

from tshark_follow import segments  # noqa: E402

# (output, capture, tcp.stream, note)
TRANSCRIPTS = [
    ("msnms_sb0.json", "ndpi/msnms.pcap", 0,
     "switchboard 192.168.1.14:1176 -> 207.46.108.39:1863, joined mid-conversation: typing notifications only"),
    ("msnms_ns.json", "ndpi/msnms.pcap", 1,
     "notification server 192.168.1.14:1037 -> 207.46.107.149:1863 (joined after login): PNG/QNG, "
     "RNG invitations, presence"),
    ("msnms_sb2.json", "ndpi/msnms.pcap", 2,
     "switchboard 192.168.1.14:1208 -> 207.46.108.83:1863: ANS, IRO, text/plain MSGs both ways, typing, BYE"),
    ("msnms_sb3.json", "ndpi/msnms.pcap", 3,
     "switchboard 192.168.1.14:1217 -> 207.46.108.41:1863: ANS, IRO, MSGs"),
    ("msnms_sb4.json", "ndpi/msnms.pcap", 4,
     "switchboard 192.168.1.14:1220 -> 207.46.108.150:1863: ANS, IRO, MSGs"),
    ("msnms_sb5.json", "ndpi/msnms.pcap", 5,
     "switchboard 192.168.1.14:1221 -> 207.46.108.59:1863: USR (client-initiated), CAL, JOI, MSGs"),
]


def main() -> None:
    for name, capture, stream, note in TRANSCRIPTS:
        segs = segments(PCAPS / capture, stream)
        doc = {"source": f"{capture} tcp.stream eq {stream}", "note": note,
               "encoding": "each segment is one TCP payload; text is the bytes decoded as latin-1",
               "segments": segs}
        (HERE / name).write_text(json.dumps(doc, indent=0, ensure_ascii=True) + "\n")
        print(name, len(segs), "segments", sum(len(s[1]) for s in segs), "bytes")


if __name__ == "__main__":
    main()
