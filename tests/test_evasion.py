"""Inspection evasion (issue 17): a file a real extractor opens must not pass as clean.

For each sample of tests/evasion_corpus.py, from both sides:
- the real tool that would open it (unzip, bsdtar, gzip, tar, dpkg-deb, 7zz, ...) recovers the payload,
  and the payload is not in the sample's raw bytes (so only an inspector that reads it as the tool does
  can see it);
- the inspection engine finds the payload (EICAR) or says `unscannable`, naming the format; and
  `imguard scan` blocks every sample.
A tool or builder that is missing fails the test when CI is set, and skips it otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import evasion_corpus as E
from imguard import cli
from imguard.inspect import InspectLimits, Inspector, load_signatures
from imguard.model import REASON_LIMIT, UNSCANNABLE

ROOT = Path(__file__).resolve().parent.parent

# Every sample the corpus builds when all its programs are installed (tools/setup.sh test installs them).
NAMES = (
    "zip-method-differential.zip", "zip-local-only.zip", "zip-size-differential.zip", "zip-name-differential.zip",
    "installer.sh", "setup.exe",
    "two-members.txt.gz", "two-streams.txt.bz2", "two-streams.txt.xz", "padded-streams.txt.xz",
    "boundary+0.gz", "boundary-1.gz", "boundary-2.gz", "boundary+1.gz",
    "boundary+0.bz2", "boundary-1.bz2", "boundary-2.bz2", "boundary+0.xz",
    "typeflag-Q.tar", "typeflag-9.tar", "typeflag-a.tar", "typeflag-contiguous.tar",
    "sparse-gnu.tar", "sparse-posix.tar",
    "disk.iso", "iso-and-zip.iso", "udf-bridge.iso", "x.deb", "x.rpm", "x.cpio", "x.xar", "x.lzh", "x.7z",
    "setup-7z.exe", "x.wim", "data.zz",
    "pdf-ahx.pdf", "pdf-a85.pdf", "pdf-lzw.pdf", "pdf-lzw-early0.pdf", "pdf-rl-ahx.pdf", "pdf-a85-flate.pdf",
    "pdf-flate-png.pdf", "pdf-lzw-tiff.pdf", "pdf-name-escape.pdf", "pdf-js-chain.pdf", "pdf-js-png-chain.pdf",
)


def missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing (tools/setup.sh test installs it)")
    pytest.skip(f"{what} is missing")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, E.Sample]:
    return {s.name: s for s in E.build(tmp_path_factory.mktemp("build"))}


@pytest.fixture(scope="module")
def inspector() -> Inspector:
    return Inspector(load_signatures(ROOT / "signatures"), InspectLimits())


def sample(corpus: dict[str, E.Sample], name: str) -> E.Sample:
    if name not in corpus:
        missing(f"the program that builds {name}")
    return corpus[name]


def test_corpus_is_whole(corpus):
    assert set(corpus) <= set(NAMES), "a new sample needs its name in NAMES"
    if set(corpus) != set(NAMES):
        missing(f"builders of {sorted(set(NAMES) - set(corpus))}")


@pytest.mark.parametrize("name", NAMES)
def test_real_tool_recovers_the_payload(corpus, name, tmp_path):
    s = sample(corpus, name)
    assert E.EICAR not in s.data, "the payload must not be visible in the raw bytes"
    path = tmp_path / s.name
    path.write_bytes(s.data)
    for tool in s.tools:
        if not tool.available():
            missing(tool.binary or tool.argv[0])
        out = tmp_path / f"out-{tool.name.replace(' ', '_')}"
        out.mkdir()
        assert E.recovered(tool.run(path, out)), f"{tool.name} does not recover the payload from {name}"


def test_iso_and_zip_is_both(corpus, tmp_path):
    s = sample(corpus, "iso-and-zip.iso")
    path = tmp_path / s.name
    path.write_bytes(s.data)
    if not E.UNZIP.available():
        missing("unzip")
    out = E.UNZIP.run(path, tmp_path)
    assert out == E.COVER        # unzip shows the cover letter; xorriso (above) shows the payload


def test_udf_view_is_named_unscannable(corpus, inspector):
    """The ISO view of a UDF bridge image is walked; the UDF view, which Windows mounts, is not ours to see."""
    s = sample(corpus, "udf-bridge.iso")
    assert unscannable_naming(inspector.inspect(s.data, name=s.name), "UDF")


def eicar_found(report) -> bool:
    return any(f.data.get("rule") == "EICAR_Test_File" for f in report.yara_matches)


def unscannable_naming(report, fmt: str) -> list:
    fmt = fmt.lower()
    return [f for f in report.all_findings() if f.kind == UNSCANNABLE and f.data.get("reason") != REASON_LIMIT
            and (fmt in f.detail.lower() or fmt in str(f.data.get("format", "")).lower())]


@pytest.mark.parametrize("name", NAMES)
def test_engine_sees_what_the_tool_sees(corpus, inspector, name):
    s = sample(corpus, name)
    report = inspector.inspect(s.data, name=s.name)
    if s.opened:
        assert eicar_found(report), f"{name} ({s.why}): EICAR not found; findings " \
            f"{[(f.kind, f.path, f.detail) for f in report.all_findings()]}"
    else:
        assert unscannable_naming(report, s.fmt), f"{name}: no unscannable finding naming {s.fmt}"


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("zip-")])
def test_zip_views_that_disagree_are_a_finding(corpus, inspector, name):
    report = inspector.inspect(corpus[name].data, name=name)
    differences = [f for f in report.findings if f.kind == UNSCANNABLE and "differences" in f.data]
    assert differences and differences[0].data["format"] == "zip"


def test_ordinary_archives_show_no_difference(inspector):
    import inspect_samples as S
    for data in (S.zip_bytes({"a.txt": b"hello", "dir/b.bin": bytes(range(256)) * 50}),
                 S.zip_bytes({"a.txt": b"hello"}, compression=0), S.docm()):
        report = inspector.inspect(data, name="ok.zip")
        assert not [f for f in report.all_findings() if f.kind == UNSCANNABLE], report.all_findings()


def test_imguard_scan_blocks_the_whole_corpus(corpus, tmp_path, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for s in corpus.values():
        (folder / s.name).write_bytes(s.data)
    assert cli.main(["scan", str(folder), "--json", "--data-dir", str(tmp_path / "data")]) == 1
    results = {Path(r["path"]).name: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(results) == set(corpus)
    for name, result in results.items():
        rules = {m["rule_id"] for m in result["decision"]["matches"]}
        assert result["decision"]["action"] == "block", f"{name}: {result['decision']}"
        assert ("malware" if corpus[name].opened else "unscannable-file") in rules, f"{name}: {rules}"


# --- PDF: what a reader cannot be shown to see, we say we did not see ----------------------------------

def test_pdf_filter_chain_decodes_exactly(corpus):
    from imguard.inspect import pdf
    payload = E.EICAR + E.COVER * 40
    for filters, encoded, parms in (
            ([b"LZWDecode"], E.lzw(payload), [{}]),
            ([b"LZWDecode"], E.lzw(payload, early=0), [{b"EarlyChange": 0}]),
            ([b"ASCII85Decode", b"FlateDecode"], E.ascii85(E.zlib.compress(E.png_predicted(payload, 7))),
             [{}, {b"Predictor": 15, b"Columns": 7}]),
            ([b"ASCIIHexDecode", b"RunLengthDecode"], E.ascii_hex(E.run_length(payload + bytes(300))), [{}, {}])):
        out, status = pdf.decode(encoded, filters, parms, 10 << 20, 200)
        assert status == "ok" and out.rstrip(b"\0") == payload.rstrip(b"\0")


@pytest.mark.parametrize("filters", [b"/Crypt", b"/NoSuchDecode", b"[/A85 /Unknown]", b"7 0 R"])
def test_pdf_stream_we_cannot_decode_is_unscannable(inspector, filters):
    data = E.pdf_script(filters, E.ascii85(E.zlib.compress(b"app.alert(1)")))
    report = inspector.inspect(data, name="x.pdf")
    assert unscannable_naming(report, "pdf"), report.findings


def test_pdf_image_filters_are_not_unscannable(inspector):
    image = E._stream(b"/Type /XObject /Subtype /Image /Width 1 /Height 1 /Filter [/A85 /DCTDecode]",
                      E.ascii85(b"\xff\xd8\xff\xd9"))
    data = E.pdf_document([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>", image])
    assert not [f for f in inspector.inspect(data, name="x.pdf").all_findings() if f.kind == UNSCANNABLE]


def test_pdf_lzw_bomb_hits_a_limit(inspector):
    bomb = E.lzw_bomb(150 << 20)
    assert len(bomb) < 100_000
    data = E.pdf_script(b"/LZWDecode", bomb)
    report = inspector.inspect(data, name="bomb.pdf")
    assert {f.data["setting"] for f in report.all_findings() if f.kind == "limit"} & {
        "max_compression_ratio", "max_expanded_bytes", "max_file_size"}
