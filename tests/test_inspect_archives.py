"""Archive walking: every member reported with its path and depth; bombs, nesting, encryption,
corruption and hostile names give explicit findings, never an exception, a hang or a memory blow-up."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

import inspect_samples as S
from imguard.inspect import InspectLimits, Inspector, load_signatures
from imguard.model import (ENCRYPTED, LIMIT_HIT, REASON_CORRUPT, REASON_ENCRYPTED, REASON_LIMIT, REASON_TOO_LARGE,
                           UNSAFE_PATH, UNSCANNABLE, FileReport)

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def signatures():
    return load_signatures(ROOT / "signatures")


@pytest.fixture(scope="module")
def inspector(signatures) -> Inspector:
    return Inspector(signatures, InspectLimits())


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return S.zeros_zip(200 * MiB)        # ~200 KB on disk, 200 MB of zeros inside


def by_path(report: FileReport) -> dict[str, FileReport]:
    return {r.path: r for r in report.walk()}


def eicar_paths(report: FileReport) -> set[str]:
    return {f.path for f in report.yara_matches if f.data["rule"] == "EICAR_Test_File"}


def limits_hit(report: FileReport) -> set[str]:
    return {f.data["setting"] for f in report.all_findings() if f.kind == LIMIT_HIT}


# --- formats -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, wrap, member", [
    ("a.zip", lambda d: S.zip_bytes({"eicar.com": d}), "a.zip!eicar.com"),
    ("a.stored.zip", lambda d: S.zip_bytes({"eicar.com": d}, compression=0), "a.stored.zip!eicar.com"),
    ("a.tar", lambda d: S.tar_bytes({"dir/eicar.com": d}), "a.tar!dir/eicar.com"),
    ("a.txt.gz", lambda d: S.gz(d), "a.txt.gz!a.txt"),
    ("blob", lambda d: S.gz(d, name="original.txt"), "blob!original.txt"),
    ("a.txt.bz2", lambda d: S.bz(d), "a.txt.bz2!a.txt"),
    ("a.txt.xz", lambda d: S.xz(d), "a.txt.xz!a.txt"),
])
def test_each_format_is_walked(inspector, name, wrap, member):
    # Deflated, the EICAR string is not visible in the raw bytes: only the walk can find it.
    report = inspector.inspect(wrap(S.EICAR + b"\n" + b"padding " * 50), name=name)
    stored = name in ("a.stored.zip", "a.tar")        # there the string is also visible in the raw bytes
    assert eicar_paths(report) == ({member, ""} if stored else {member})
    assert by_path(report)[member].depth == 1
    assert report.unscannable_reasons == []


def test_eicar_in_zip_in_tar_gz(inspector):
    data = S.gz(S.tar_bytes({"docs/inner.zip": S.zip_bytes({"eicar.txt": S.EICAR})}), name="bundle.tar")
    report = inspector.inspect(data, name="bundle.tar.gz")
    assert eicar_paths(report) == {"bundle.tar.gz!bundle.tar!docs/inner.zip!eicar.txt"}
    reports = by_path(report)
    paths = ("bundle.tar.gz", "bundle.tar.gz!bundle.tar", "bundle.tar.gz!bundle.tar!docs/inner.zip",
             "bundle.tar.gz!bundle.tar!docs/inner.zip!eicar.txt")
    assert [reports[p].depth for p in paths] == [0, 1, 2, 3]
    assert report.unscannable_reasons == []


def test_mixed_nesting_of_every_format(inspector):
    core = S.zip_bytes({"run.exe": S.pe()})
    data = S.xz(S.tar_bytes({"a.bz2": S.bz(S.gz(core, name="core.zip"))}))
    report = inspector.inspect(data, name="all.tar.xz")
    pe_hits = [f.path for f in report.yara_matches if f.data["rule"] == "Executable_PE"]
    assert pe_hits == ["all.tar.xz!all.tar!a.bz2!a!core.zip!run.exe"]


@pytest.mark.parametrize("header", [b"7z\xbc\xaf\x27\x1c\x00\x04", b"Rar!\x1a\x07\x01\x00"])
def test_broken_archives_libarchive_opens_are_unscannable_corrupt(inspector, header):
    report = inspector.inspect(header + bytes(range(256)) * 4, name="x.bin")
    assert report.family == "archive" and report.unscannable_reasons == ["corrupt"]


@pytest.mark.parametrize("header, fmt", [(b"MSWIM\0\0\0", "WIM"), (b"ITSF\x03\0\0\0\x60\0\0\0", "chm"),
                                         (b"vhdxfile", "VHDX")])
def test_archives_we_do_not_open_are_unscannable_unsupported_and_named(inspector, header, fmt):
    report = inspector.inspect(header + bytes(range(256)) * 4, name="x.bin")
    assert report.family == "archive" and report.unscannable_reasons == ["unsupported"]
    [finding] = [f for f in report.findings if f.kind == "unscannable"]
    assert fmt.lower() in finding.data["format"].lower() and fmt.lower() in finding.detail.lower()


def test_jar_is_walked(inspector):
    data = S.zip_bytes({"META-INF/MANIFEST.MF": b"Manifest-Version: 1.0\n", "lib/native.so": S.elf()})
    report = inspector.inspect(data, name="app.jar")
    assert "Executable_ELF" in {f.data["rule"] for f in report.yara_matches}


# --- limits --------------------------------------------------------------------------------------

def test_zip_bomb_stops_at_the_ratio_limit_cheaply(inspector, bomb):
    tracemalloc.start()
    started = time.perf_counter()
    report = inspector.inspect(bomb, name="bomb.zip")
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    member = report.members[0]
    assert "max_compression_ratio" in limits_hit(member) and REASON_LIMIT in member.unscannable_reasons
    assert member.size == 200 * MiB            # the declared size is reported
    assert peak < 40 * MiB, peak
    assert elapsed < 5


def test_zip_bomb_with_lying_sizes_is_cut_by_the_stream(inspector, bomb):
    """Headers that claim a small member do not fool the streaming check."""
    raw = bytearray(bomb)
    central = raw.find(b"PK\x01\x02")
    raw[central + 24:central + 28] = (1000).to_bytes(4, "little")      # uncompressed size: 1000 (zip64 -> 32-bit)
    report = inspector.inspect(bytes(raw), name="liar.zip")
    assert isinstance(report, FileReport)
    assert report.unscannable_reasons, report.to_dict()         # corrupt or limit, never "clean"


def test_expanded_bytes_budget_bounds_memory(signatures, bomb):
    limits = InspectLimits(max_compression_ratio=10**9, max_expanded_bytes=20 * MiB, max_file_size=300 * MiB)
    tracemalloc.start()
    report = Inspector(signatures, limits).inspect(bomb, name="bomb.zip")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "max_expanded_bytes" in limits_hit(report)
    assert {f.data["value"] for f in report.all_findings() if f.kind == LIMIT_HIT} == {20 * MiB}
    assert peak < 3 * 20 * MiB, peak


def test_gzip_bomb(inspector):
    data = S.gz(bytes(50 * MiB))
    report = inspector.inspect(data, name="zeros.gz")
    assert "max_compression_ratio" in limits_hit(report)


def test_member_bigger_than_max_file_size(signatures):
    data = S.zip_bytes({"big.txt": b"a" * 5000, "small.com": S.EICAR})
    report = Inspector(signatures, InspectLimits(max_file_size=2000)).inspect(data, name="x.zip")
    reports = by_path(report)
    assert reports["x.zip!big.txt"].unscannable_reasons == [REASON_TOO_LARGE]
    assert eicar_paths(report) == {"x.zip!small.com"}


def test_twenty_levels_of_nesting_stop_at_the_depth_limit(inspector):
    data = S.nested_zip(20)
    report = inspector.inspect(data, name="deep.zip")
    depths = [r.depth for r in report.walk()]
    assert max(depths) == 5 == InspectLimits().max_archive_depth
    deepest = [r for r in report.walk() if r.depth == 5][0]
    assert "max_archive_depth" in limits_hit(deepest) and REASON_LIMIT in deepest.unscannable_reasons
    assert REASON_LIMIT in report.unscannable_reasons


def test_member_count_limit(signatures):
    data = S.zip_bytes({f"f{i}.txt": b"x" for i in range(50)})
    report = Inspector(signatures, InspectLimits(max_archive_members=10)).inspect(data, name="many.zip")
    assert len(report.members) == 10
    assert "max_archive_members" in limits_hit(report) and REASON_LIMIT in report.unscannable_reasons


def test_member_count_is_shared_by_nested_archives(signatures):
    inner = S.zip_bytes({f"i{i}.txt": b"x" for i in range(8)})
    data = S.zip_bytes({f"z{i}.zip": inner for i in range(5)})
    report = Inspector(signatures, InspectLimits(max_archive_members=20)).inspect(data, name="outer.zip")
    assert sum(1 for _ in report.walk()) - 1 <= 20
    assert "max_archive_members" in limits_hit(report)


# --- encryption, corruption, names ---------------------------------------------------------------

def test_encrypted_member(inspector):
    report = inspector.inspect(S.encrypted_zip("secret.exe"), name="locked.zip")
    member = by_path(report)["locked.zip!secret.exe"]
    assert member.encrypted is True
    assert ENCRYPTED in [f.kind for f in member.findings]
    assert member.unscannable_reasons == [REASON_ENCRYPTED]
    assert by_path(report)["locked.zip!readme.txt"].unscannable_reasons == []


def test_truncated_zip_still_reports_what_could_be_read(inspector):
    data = S.zip_bytes([("eicar.com", S.EICAR * 20), ("second.txt", b"y" * 20000)])
    cut = data[:len(data) // 2]          # central directory gone, second member cut
    report = inspector.inspect(cut, name="cut.zip")
    assert REASON_CORRUPT in report.unscannable_reasons
    assert "cut.zip!eicar.com" in eicar_paths(report)


def test_truncated_tar_gz(inspector):
    data = S.gz(S.tar_bytes({"a.txt": S.EICAR + b"a" * 30000, "b.txt": b"b" * 30000}))
    report = inspector.inspect(data[: len(data) - 20], name="cut.tar.gz")
    assert REASON_CORRUPT in report.unscannable_reasons
    assert eicar_paths(report)          # the first member was still read and scanned


def test_corrupt_tar(inspector):
    data = bytearray(S.tar_bytes({"a.txt": b"hello", "b.txt": b"world"}))
    data[512 + 512: 512 + 512 + 100] = b"\xff" * 100        # smash the second header
    report = inspector.inspect(bytes(data), name="bad.tar")
    assert report.members[0].name == "a.txt" and REASON_CORRUPT in report.unscannable_reasons
    cut = S.tar_bytes({"a.txt": b"hello", "b.txt": b"world"})[:512 + 512 + 200]     # cut inside the 2nd header
    report = inspector.inspect(cut, name="cut.tar")
    assert [m.name for m in report.members] == ["a.txt"] and REASON_CORRUPT in report.unscannable_reasons
    whole = inspector.inspect(S.tar_bytes({"a.txt": b"hello", "b.txt": b"world"}), name="ok.tar")
    assert whole.unscannable_reasons == [] and len(whole.members) == 2


def test_corrupt_deflate_data_in_a_member(inspector):
    data = bytearray(S.zip_bytes({"a.txt": b"hello world " * 1000}))
    data[40:80] = b"\x00" * 40          # damage the deflate stream of the first member
    report = inspector.inspect(bytes(data), name="bad.zip")
    assert REASON_CORRUPT in report.unscannable_reasons


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/cron.d/job", "a/../../b.txt", "..\\..\\win.ini",
                                  "C:\\Windows\\evil.dll"])
def test_unsafe_member_names(inspector, name):
    report = inspector.inspect(S.zip_bytes({name: b"data"}), name="x.zip")
    [unsafe] = [f for f in report.findings if f.kind == UNSAFE_PATH]
    assert unsafe.data["member"] == name and unsafe.path == f"x.zip!{name}"


def test_safe_member_names_are_not_flagged(inspector):
    report = inspector.inspect(S.zip_bytes({"a/b/c..d.txt": b"x", "..hidden": b"y"}), name="x.zip")
    assert UNSAFE_PATH not in [f.kind for f in report.all_findings()]


def test_unsafe_tar_names_and_links(inspector):
    report = inspector.inspect(S.tar_bytes({"../escape.txt": b"x"}), name="a.tar")
    assert UNSAFE_PATH in [f.kind for f in report.findings]
    report = inspector.inspect(S.tar_with_link("innocent", "/etc/shadow"), name="b.tar")
    assert UNSAFE_PATH in [f.kind for f in report.findings]


def test_unscannable_findings_never_come_alone(inspector, bomb):
    """Every report that was cut short says why (a reason from the model) and nothing raises."""
    from imguard.model import UNSCANNABLE_REASONS
    for data in (bomb, S.nested_zip(20), S.encrypted_zip(), S.zip_bytes({"a": b"b"})[:30]):
        report = inspector.inspect(data, name="x.zip")
        for finding in report.all_findings():
            if finding.kind == UNSCANNABLE:
                assert finding.data["reason"] in UNSCANNABLE_REASONS


def test_mutated_archives_never_raise_or_hit_the_safety_net(inspector):
    """Random byte flips and cuts in every supported container: each gives a report made by the
    walkers themselves (not the catch-all 'internal inspection error')."""
    import random
    import zlib
    rng = random.Random(2026)
    seeds = [S.zip_bytes({"a.txt": b"hello " * 300, "b/c.exe": S.pe()}), S.docm(),
             S.gz(S.tar_bytes({"x.txt": b"x" * 3000, "y.zip": S.zip_bytes({"e": S.EICAR})})),
             S.bz(S.tar_bytes({"x.txt": b"y" * 3000})), S.xz(b"z" * 5000), S.png() + S.zip_bytes({"q": b"q" * 100}),
             S.jpeg() + S.pe(), S.gif() + b"tail", S.encrypted_zip(), S.nested_zip(4),
             S.pdf_with_streams(b"/OpenAction 3 0 R",
                                [(b"/Filter /FlateDecode", zlib.compress(b"/JS (x) " * 50)),
                                 (b"/Type /EmbeddedFile /Filter /FlateDecode", zlib.compress(S.pe()))])]
    for _ in range(400):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[:rng.randrange(1, len(data))]
        report = inspector.inspect(bytes(data), name="fuzz.zip")
        assert not any("internal inspection error" in f.detail for f in report.all_findings()), report.to_dict()


def _udf() -> bytes:
    """The volume recognition sequence of a UDF image (ECMA-167): BEA01, NSR02, TEA01 from 32 KiB."""
    sectors = [bytes(0x8000)] + [b"\0" + ident + b"\x01" + bytes(2041) for ident in (b"BEA01", b"NSR02", b"TEA01")]
    return b"".join(sectors) + bytes(4096)


def _fat() -> bytes:
    boot = bytearray(512)
    boot[0:3], boot[3:11], boot[54:62], boot[510:512] = b"\xeb\x3c\x90", b"MSDOS5.0", b"FAT16   ", b"\x55\xaa"
    return bytes(boot) + bytes(8192)


@pytest.mark.parametrize("data, fmt", [
    (_udf(), "UDF"),
    (bytes(range(256)) * 40 + b"conectix" + bytes(504), "VHD"),               # fixed VHD: footer at the end
    (bytes(range(256)) * 40 + b"koly" + bytes(508), "DMG"),                  # UDIF trailer
    (_fat(), "FAT"),
    (bytes(512) + b"EFI PART" + bytes(4096), "GPT"),
])
def test_disk_images_are_recognised_and_unscannable(inspector, data, fmt):
    report = inspector.inspect(data, name="disk.img")
    assert report.family == "archive"
    named = [f for f in report.findings if f.kind == UNSCANNABLE and fmt.lower() in f.data.get("format", "").lower()]
    assert named and named[0].data["reason"] == "unsupported"


def test_libarchive_walk_is_bounded(inspector):
    """A cpio of many members stops at max_archive_members; the bytes cap holds as for zip."""
    import libarchive
    import io as _io
    buffer = _io.BytesIO()
    with libarchive.custom_writer(buffer.write, "cpio_newc") as archive:
        for i in range(30):
            archive.add_file_from_memory(f"f{i}.txt", 10, b"0123456789")
    small = Inspector(inspector.signatures, InspectLimits(max_archive_members=10))
    report = small.inspect(buffer.getvalue(), name="x.cpio")
    assert len(report.members) == 10 and "max_archive_members" in limits_hit(report)


@pytest.mark.parametrize("compression", ["zstd", "lz4", "lzip", "compress", "lzma"])
def test_single_streams_libarchive_decodes_are_walked(inspector, compression):
    """Written by libarchive itself (an independent writer); before libarchive these were 'archive, unseen'."""
    import io as _io

    import libarchive
    out = _io.BytesIO()
    with libarchive.custom_writer(out.write, "raw", filter_name=compression) as archive:
        archive.add_file_from_memory("x", len(S.EICAR) * 20, S.EICAR * 20)
    report = inspector.inspect(out.getvalue(), name=f"x.{compression}")
    assert eicar_paths(report) and not report.unscannable_reasons
