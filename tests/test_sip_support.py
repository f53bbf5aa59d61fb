"""Helpers for the SIP and MSRP tests: the RFC-derived messages in tests/data/sip, builders, a file verdict.

The checker, `sends`, `records`, `anomalies` and `feed` are the IRC tests' (tests/test_irc_support.py).
"""

from __future__ import annotations

from pathlib import Path

from imguard.model import ALLOW, BLOCK, Decision, FileReport, RuleMatch
from imguard.protocols.base import InspectFile
from imguard.protocols.msrp.framing import MsrpDecoder
from tests.test_irc_support import Checker, anomalies, feed, records, sends  # noqa: F401  (re-exported)

DATA = Path(__file__).parent / "data" / "sip"

ALLOWED = Decision(action=ALLOW)
BLOCKED = Decision(action=BLOCK, matches=[RuleMatch("no-exe", BLOCK, "high", "enforce", title="no programs")])


def load(name: str) -> bytes:
    """A stored message with CRLF line ends; `{length}` is filled with the body's length (SIP)."""
    text = (DATA / name).read_text().rstrip("\n")
    if name.endswith(".msrp"):
        return (text.replace("\n", "\r\n") + "\r\n").encode()
    head, _, body = text.partition("\n\n")
    body_bytes = body.replace("\n", "\r\n").encode()
    if "application/sdp" in head:
        body_bytes += b"\r\n"
    head = head.replace("{length}", str(len(body_bytes)))
    return head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body_bytes


def sip(start: str, headers: list[tuple[str, str]], body: bytes = b"", length: int | None = None) -> bytes:
    """A SIP message; Content-Length is the body's unless `length` says otherwise (a lie)."""
    lines = [start] + [f"{n}: {v}" for n, v in headers]
    lines.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def message(text: str | bytes, content_type: str = "text/plain;charset=UTF-8", frm: str = "<sip:alice@a.example>",
            to: str = "<sip:bob@b.example>", extra: list[tuple[str, str]] = (), ruri: str = "sip:bob@b.example",
            cseq: int = 1, vias: int = 2) -> bytes:
    body = text.encode() if isinstance(text, str) else text
    headers = [("Via", f"SIP/2.0/TCP 10.0.0.{i};branch=z9hG4bK-{i}-{cseq}") for i in range(7, 7 + vias)]
    headers += [("Max-Forwards", "70"), ("From", f"{frm};tag=49583"), ("To", to),
                ("Call-ID", f"asd88asd77a-{cseq}@10.0.0.7"), ("CSeq", f"{cseq} MESSAGE"), *extra,
                ("Content-Type", content_type)]
    return sip(f"MESSAGE {ruri} SIP/2.0", headers, body)


TO_PATH = "msrp://bobpc.example.com:8888/9di4ea;tcp"
FROM_PATH = "msrp://alicepc.example.com:7654/jshA7we;tcp"


def chunk(tid: str, body: bytes | None, start: int = 1, total: int | str | None = None, flag: str = "$",
          message_id: str = "12339sdqwer", content_type: str | None = "text/plain", to_path: str = TO_PATH,
          from_path: str = FROM_PATH, end: int | str | None = None, extra: list[tuple[str, str]] = ()) -> bytes:
    """One MSRP SEND chunk (RFC 4975 §7.1.1)."""
    lines = [f"MSRP {tid} SEND", f"To-Path: {to_path}", f"From-Path: {from_path}", f"Message-ID: {message_id}"]
    lines += [f"{n}: {v}" for n, v in extra]
    if body is not None:
        last = start + len(body) - 1 if end is None else end
        lines.append(f"Byte-Range: {start}-{last}/{'*' if total is None else total}")
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body + f"\r\n-------{tid}{flag}\r\n".encode()
    return ("\r\n".join(lines) + f"\r\n-------{tid}{flag}\r\n").encode()


def response(tid: str, status: int = 200, comment: str = "OK", to_path: str = FROM_PATH,
             from_path: str = TO_PATH) -> bytes:
    return (f"MSRP {tid} {status} {comment}\r\nTo-Path: {to_path}\r\nFrom-Path: {from_path}\r\n"
            f"-------{tid}$\r\n").encode()


def file_chunks(data: bytes, size: int, content_type: str = "application/octet-stream",
                message_id: str = "f1", tid_prefix: str = "t") -> list[tuple[int, bytes]]:
    """(start, chunk bytes) of `data` sent in `size`-byte chunks, '+' on all but the last."""
    out = []
    for i, pos in enumerate(range(0, len(data), size)):
        part = data[pos:pos + size]
        flag = "$" if pos + size >= len(data) else "+"
        out.append((pos + 1, chunk(f"{tid_prefix}{i:04d}", part, start=pos + 1, total=len(data), flag=flag,
                                   message_id=message_id, content_type=content_type)))
    return out


def parse_msrp(data: bytes) -> list:
    """The chunks in a byte string (what a session sent)."""
    return MsrpDecoder().feed(data)


def inspects(cmds) -> list[InspectFile]:
    return [c for c in cmds if isinstance(c, InspectFile)]


def report(job: InspectFile) -> FileReport:
    return FileReport(name=job.name, path=job.name, size=len(job.data))
