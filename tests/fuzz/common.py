"""What every fuzz harness shares: the input format, a checker and file verdicts that take every branch, the
session driver, the seed corpus from tests/data, and the atheris entry point.

The contract under test (docs/architecture.md, "Bad input"): a decoder or session turns any bytes into commands and
anomalies, never an exception, and never gives up with an internal error. A harness raises `Finding` (or lets an
exception through) when it does not hold; atheris (libFuzzer) then saves the input as a crash file.

Input format, so a transcript of both directions is one input: segments, each `flags (1 byte) | length (2 bytes,
big-endian) | bytes` (a short last segment takes what is left). Flags: bit 0 from the client, bit 1 that side
closes after this segment, bit 2 the carrier reports TLS as started (after a StartTls), bit 3 the files out for
inspection stay there (their verdicts come later, while more bytes arrive). `encode()` makes an input
from (from_client, bytes) pairs; the seeds are the stored transcripts encoded so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

from imguard.files.expected import ExpectedTransfers
from imguard.model import ALERT, ALLOW, BLOCK, MASK, QUARANTINE, ChatContext, Decision, FileReport, RuleMatch
from imguard.protocols.base import Anomaly, InspectFile, Notify, Record, StartTls

DATA = Path(__file__).resolve().parents[1] / "data"
CTX = ChatContext(client_address="10.0.0.7:40000", server_address="10.0.0.9:5222", connection_id="fuzz-1")
MAX_SEGMENT = 0xFFFF
# An internal error a session reports instead of raising is a finding as well: the contract is an anomaly that
# says what was wrong with the input, not a caught crash.
INTERNAL = frozenset({"internal_error", "session_error"})


class Finding(AssertionError):
    """The harness saw the contract broken (the exception it raises carries what)."""


# --- input --------------------------------------------------------------------------------------------------

def encode(segments: Iterable[tuple[bool, bytes]], close_at_end: bool = False) -> bytes:
    out = bytearray()
    items = list(segments)
    for i, (from_client, data) in enumerate(items):
        data = bytes(data)
        for pos in range(0, max(len(data), 1), MAX_SEGMENT):
            piece = data[pos:pos + MAX_SEGMENT]
            last = close_at_end and i == len(items) - 1 and pos + MAX_SEGMENT >= len(data)
            out += bytes([int(from_client) | (2 if last else 0)]) + len(piece).to_bytes(2, "big") + piece
    return bytes(out)


def decode(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(flags, bytes) segments of a fuzz input; any bytes are a valid input."""
    i = 0
    while i < len(data):
        flags = data[i]
        length = int.from_bytes(data[i + 1:i + 3].ljust(2, b"\0"), "big")
        yield flags, data[i + 3:i + 3 + length]
        i += 3 + length


def transcript(path: Path) -> list[tuple[bool, bytes]]:
    """A stored transcript (tests/data/*/*.json: {"segments": [["c"|"s", latin-1 text], ...]})."""
    doc = json.loads(path.read_text())
    return [(side == "c", text.encode("latin-1")) for side, text in doc["segments"]]


def transcript_seeds(*patterns: str) -> list[bytes]:
    seeds = []
    for pattern in patterns:
        for path in sorted(DATA.glob(pattern)):
            seeds.append(encode(transcript(path), close_at_end=True))
    return seeds


# --- policy stand-ins that take every branch -------------------------------------------------------------------

class Checker:
    """Decides by the text's length, so the fuzzer reaches allow, alert, mask (with a notice, and with a mask
    that grows the text), block and quarantine."""

    MATCH = [RuleMatch("fuzz", BLOCK, "high", "enforce", title="fuzz rule", notice="fuzz notice")]

    def check_message(self, text: str, ctx: ChatContext) -> Decision:
        if not isinstance(text, str):
            raise Finding(f"check_message got {type(text).__name__}, not str")
        pick = len(text) % 6
        if pick == 1:
            return Decision(action=BLOCK, matches=self.MATCH, notice="blocked: fuzz")
        if pick == 2:
            return Decision(action=MASK, matches=self.MATCH, masked_text=text[: len(text) // 2] + "*" * 3)
        if pick == 3:
            return Decision(action=MASK, matches=self.MATCH, masked_text=text + "\r\n\x00<&>" * 2, notice="m")
        if pick == 4:
            return Decision(action=QUARANTINE, matches=self.MATCH)
        if pick == 5:
            return Decision(action=ALERT, matches=self.MATCH)
        return Decision(action=ALLOW)


def verdict(job: InspectFile) -> tuple[FileReport, Decision]:
    report = FileReport(name=job.name or "f", path=job.name or "f", size=len(job.data))
    blocked = len(job.data) % 2 == 1
    return report, Decision(action=BLOCK if blocked else ALLOW, matches=Checker.MATCH if blocked else [],
                            notice="file notice" if len(job.data) % 3 == 0 else "")


# --- driving a session --------------------------------------------------------------------------------------

def check_commands(cmds: list) -> list[InspectFile]:
    """The commands a session returned are well-formed; an internal error is a finding. Returns its InspectFiles."""
    jobs = []
    for c in cmds:
        if isinstance(c, InspectFile):
            jobs.append(c)
        elif isinstance(c, (Anomaly, Record, Notify)) or hasattr(c, "event"):
            event = c.event if isinstance(c, Record) else c.event()
            kind = event.get("imguard", {}).get("anomaly", {}).get("kind")
            if kind in INTERNAL:
                raise Finding(f"the session reported {kind}: {event.get('message') or event}")
            json.dumps(event, default=str)          # every event can be written
    return jobs


def drive(make: Callable[[], object], data: bytes, datagrams: bool = False) -> None:
    """Feed one fuzz input to a fresh session: its segments, file verdicts as they are asked for, TLS starts
    when asked, the closes; at the end both sides close and the files still out get their verdicts."""
    session = make()
    pending: list[InspectFile] = []
    tls_asked = False

    def run(cmds) -> None:
        nonlocal tls_asked
        cmds = list(cmds or [])
        if any(isinstance(c, StartTls) for c in cmds):
            tls_asked = True
        pending.extend(check_commands(cmds))

    def settle() -> None:
        while pending:
            job = pending.pop(0)
            report, decision = verdict(job)
            run(session.file_verdict(job.transfer_id, report, decision))

    receive = session.datagram_received if datagrams else session.data_received
    for flags, segment in decode(data):
        from_client = bool(flags & 1)
        run(receive(from_client, segment))
        if flags & 4 and tls_asked and hasattr(session, "tls_started"):
            tls_asked = False
            run(session.tls_started())
        if len(pending) and flags & 8 == 0:
            settle()
        if flags & 2 and not datagrams:
            run(session.connection_closed(from_client))
    if not datagrams:
        run(session.connection_closed(True))
        run(session.connection_closed(False))
    settle()


def new_transfers() -> ExpectedTransfers:
    return ExpectedTransfers()
