"""Peak memory under hostile inputs stays within the budget the settings promise (docs/deploy.md, "Memory
budget").

Each case runs in its own Python process (`python -m tests.test_memory_budget CASE`): the real session is built
and fed the input, and the process reports its peak RSS (VmHWM). The same process fed nothing is the baseline,
measured in the same run; a case passes when its peak is within baseline + the budget its settings derive +
a fixed slack for the parser's own buffers. No timing is asserted.

- ibb: one XMPP connection opens `max_transfers` in-band streams and sends each a full `max_held_bytes` file
  in 4 KiB blocks, interleaved, never closing: everything held is held at once. Budget: `connection_bound`.
- dcc: a DCC SEND that announced no size sends just under `max_held_bytes` and closes: held and handed out
  for inspection. Budget: the file, and the one copy inspection gets (2 x max_held_bytes).
- dcc_over: the same sender keeps going past `max_held_bytes`: cut at it (dcc_too_large). Budget: the file.
- server_stanza: the server sends one stanza under `max_server_stanza_size` made of empty elements (each a few
  hundred bytes once parsed): ended at `max_stanza_elements` (stanza_too_large). Budget: the stanza's bytes and
  its elements parsed.
- inspect (the real engine, bundled signatures): a zip64 whose central directory lists 300,000 entries, and a
  20 MiB PDF of 400,000 tiny filtered streams: stopped at `max_zip_entries` / `max_pdf_streams` (LIMIT_HIT,
  unscannable). Budget: 3x the file, `max_expanded_bytes`, and the entries or streams looked at.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
SLACK = 12 * MiB        # parser buffers, the largest read in flight, allocator rounding

IBB_LIMITS = dict(max_held_bytes=4 * MiB, max_transfers=16)
DCC_MAX = 48 * MiB
SERVER_STANZA = dict(max_server_stanza_size=8 * MiB)
ELEMENT_COST = 512      # what one parsed element may take (Element, attributes dict, tag string)


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


# --- the cases (run in the child) --------------------------------------------------------------------------

def _xmpp(**limits):
    from tests.test_xmpp_session import logged_in
    from imguard.protocols.xmpp import XmppLimits
    return logged_in(limits=XmppLimits(**limits))


def _kinds(cmds) -> list[str]:
    from tests.test_xmpp_session import anomalies
    return anomalies(cmds)


def case_baseline_xmpp() -> dict:
    _xmpp(**IBB_LIMITS)
    return {}


def case_ibb() -> dict:
    from imguard.protocols.xmpp.ibb import connection_bound
    s = _xmpp(**IBB_LIMITS)
    kinds: list[str] = []
    n, block = IBB_LIMITS["max_transfers"], 4096
    for i in range(n):
        kinds += _kinds(s.data_received(True, (
            f"<iq type='set' id='o{i}' to='bob@localhost/t'><open xmlns='http://jabber.org/protocol/ibb' "
            f"sid='s{i}' block-size='{block}'/></iq>").encode()))
    most = 0
    payload = base64.b64encode(bytes(range(256)) * (block // 256)).decode()
    for seq in range(IBB_LIMITS["max_held_bytes"] // block):
        for i in range(n):
            kinds += _kinds(s.data_received(True, (
                f"<iq type='set' id='d{i}-{seq}' to='bob@localhost/t'><data xmlns='http://jabber.org/protocol/ibb' "
                f"sid='s{i}' seq='{seq}'>{payload}</data></iq>").encode()))
        most = max(most, s.ibb.holds.held_bytes)
    return {"budget": connection_bound(s.limits), "held": most, "kinds": sorted(set(kinds))}


def _dcc(sent: int) -> dict:
    from imguard.protocols.base import InspectFile
    from imguard.protocols.irc.decoder import IrcLimits
    from tests.test_irc_dcc import offer, session, anomalies
    s = session(offer(size=None), limits=IrcLimits(max_held_bytes=DCC_MAX))
    chunk = b"\x55" * 65536
    out, kinds = [], []
    for _ in range(sent // len(chunk)):
        cmds = s.data_received(False, chunk)
        kinds += anomalies(cmds)
        out += [c for c in cmds if isinstance(c, InspectFile)]
    cmds = s.connection_closed(False)
    jobs = out + [c for c in cmds if isinstance(c, InspectFile)]
    return {"kinds": sorted(set(kinds + anomalies(cmds))), "inspected": [len(j.data) for j in jobs]}


def case_baseline_dcc() -> dict:
    return _dcc(0)


def case_dcc() -> dict:
    return {**_dcc(DCC_MAX - MiB), "budget": 2 * DCC_MAX}


def case_dcc_over() -> dict:
    return {**_dcc(DCC_MAX + 16 * MiB), "budget": DCC_MAX}


def case_server_stanza() -> dict:
    s = _xmpp(**SERVER_STANZA)
    size = SERVER_STANZA["max_server_stanza_size"] - 4096
    head = b"<iq type='result' id='r1' to='alice@localhost/t'><query xmlns='jabber:iq:roster'>"
    kinds = _kinds(s.data_received(False, head))
    filler = b"<a/>" * (64 * 1024 // 4)
    for _ in range((size - len(head)) // len(filler)):
        kinds += _kinds(s.data_received(False, filler))
        if s.closed:
            break
    return {"kinds": sorted(set(kinds)), "budget": SERVER_STANZA["max_server_stanza_size"]
            + s.limits.max_stanza_elements * ELEMENT_COST}


# --- inspection: the real engine, with the bundled signatures -------------------------------------------------

INSPECT_LIMITS = dict(max_expanded_bytes=16 * MiB)
ZIP_ENTRIES = 300_000       # in a zip64 directory of about 14 MiB
PDF_STREAMS = 400_000       # in a PDF of about 20 MiB


def hostile_zip(entries: int) -> bytes:
    """One empty member, and a zip64 central directory listing it `entries` times (zipfile reads that)."""
    import struct
    import zlib
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, zlib.crc32(b""), 0, 0, 1, 0) + b"a"
    record = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 20, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"a"
    directory = record * entries
    start, size = len(local), len(directory)
    zip64_end = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size, start)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, start + size, 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return local + directory + zip64_end + locator + end


def hostile_pdf(streams: int) -> bytes:
    """A PDF of `streams` tiny streams, each under a filter a reader decodes."""
    body = b"".join(b"%d 0 obj<</Length 3/Filter/ASCIIHexDecode>>stream\n41>\nendstream endobj\n" % i
                    for i in range(1, streams + 1))
    return b"%PDF-1.4\n" + body + b"trailer<<>>\n%%EOF\n"


def _inspect(path: str) -> dict:
    """Inspect the file at `path` (made by the parent: building it here would count in the peak)."""
    from imguard.inspect import InspectLimits, Inspector, load_signatures
    data = Path(path).read_bytes()
    limits = InspectLimits(**INSPECT_LIMITS)
    inspector = Inspector(load_signatures(ROOT / "signatures"), limits)
    report = inspector.inspect(data, name="f")
    settings = sorted({f.data.get("setting") for f in report.findings if f.data.get("setting")})
    return {"settings": settings, "verdicts": sorted({f.kind for f in report.findings}),
            # The per-inspection budget of docs/deploy.md: the file three times (the file, a PDF's decoded view
            # and its pieces), what may be expanded, and the entries or streams looked at.
            "budget": 3 * len(data) + limits.max_expanded_bytes + max(limits.max_zip_entries, limits.max_pdf_streams)
            * ELEMENT_COST}


def case_inspect(path: str) -> dict:
    return _inspect(path)


def child(case: str, *args: str) -> None:
    result = globals()[f"case_{case}"](*args)
    print(json.dumps({**result, "peak": peak_rss()}))


# --- the tests (run in pytest) -----------------------------------------------------------------------------

def run_case(case: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tests.test_memory_budget", case, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def within(case: str, baseline: str, args: tuple[str, ...] = (), baseline_args: tuple[str, ...] = ()) -> dict:
    base, got = run_case(baseline, *baseline_args), run_case(case, *args)
    grown = got["peak"] - base["peak"]
    assert grown <= got["budget"] + SLACK, (f"{case}: peak RSS grew {grown / MiB:.1f} MiB over the baseline "
                                            f"({base['peak'] / MiB:.1f} MiB); budget {got['budget'] / MiB:.1f} MiB "
                                            f"+ {SLACK / MiB:.0f} MiB slack; {got}")
    got["grown"] = grown
    return got


def test_ibb_connection_holds_its_budget():
    got = within("ibb", "baseline_xmpp")
    assert got["held"] <= got["budget"]
    assert got["budget"] == IBB_LIMITS["max_transfers"] * IBB_LIMITS["max_held_bytes"]
    # The bound was reached (streams past it were cut), so the peak measured is the budget's, not less.
    assert "ibb_too_large" in got["kinds"] and got["held"] > got["budget"] * 3 // 4, got


def test_dcc_without_a_size_is_held_once_and_inspected_once():
    got = within("dcc", "baseline_dcc")
    assert got["inspected"] == [DCC_MAX - MiB] and "dcc_too_large" not in got["kinds"]
    assert got["grown"] >= DCC_MAX - MiB        # the file was really held (the measure can see it)


def test_dcc_without_a_size_is_cut_at_max_held_bytes():
    got = within("dcc_over", "baseline_dcc")
    assert "dcc_too_large" in got["kinds"] and got["inspected"] == []


def test_huge_server_stanza_is_refused_before_it_is_held_whole():
    got = within("server_stanza", "baseline_xmpp")
    assert "stanza_too_large" in got["kinds"], got


def _inspected(tmp_path: Path, hostile: bytes) -> dict:
    """Inspect `hostile` against the baseline of a one-stream PDF, both read from files."""
    (tmp_path / "hostile").write_bytes(hostile)
    (tmp_path / "small").write_bytes(hostile_pdf(1))
    return within("inspect", "inspect", (str(tmp_path / "hostile"),), (str(tmp_path / "small"),))


def test_huge_zip_directory_is_not_parsed(tmp_path):
    got = _inspected(tmp_path, hostile_zip(ZIP_ENTRIES))
    assert "max_zip_entries" in got["settings"] and "unscannable" in got["verdicts"], got


def test_pdf_with_many_streams_is_bounded(tmp_path):
    got = _inspected(tmp_path, hostile_pdf(PDF_STREAMS))
    assert "max_pdf_streams" in got["settings"] and "unscannable" in got["verdicts"], got


if __name__ == "__main__":
    child(*sys.argv[1:])
else:
    pytestmark = pytest.mark.timeout(900)
