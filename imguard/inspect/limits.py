"""The limits of one inspection: every bound on work or memory that hostile content could push."""

from __future__ import annotations

from dataclasses import dataclass

from imguard.settings import KiB, MiB, setting


@dataclass(frozen=True)
class InspectLimits:
    """Inspection limits (file size, archive walking, YARA time)"""

    max_file_size: int = setting(
        100 * MiB,
        "Largest file (or archive member) that is read and scanned, in bytes. A bigger one is reported "
        "UNSCANNABLE too_large without being scanned; 100 MiB matches the largest chat attachments the "
        "research saw and keeps one scan under about a second with a few thousand rules.")
    max_hash_size: int = setting(
        1024 * MiB,
        "A file over max_file_size still gets its hashes (streamed in 1 MiB chunks, so memory stays "
        "bounded) when it is at most this big, so a known-bad hash can still be matched; 0 disables.")
    digests: str = setting(
        "sha256,sha1,md5",
        "Digests computed for the file and each member, comma separated, from sha256, sha1, md5. The three "
        "cost about 2.9 ms/MB of CPU (MD5 alone 1.6 ms/MB), close to half a YARA scan with a few thousand "
        "rules; drop some where CPU is short and no policy or feed needs them.")
    max_archive_depth: int = setting(
        5,
        "Deepest archive nesting that is opened: the file is depth 0, its members depth 1, ... A member "
        "at this depth is typed, hashed and scanned but not opened (LIMIT_HIT). 5 leaves room for real "
        "nesting such as mail.zip!docs.tar.gz!docs.tar!report.docx!word/vbaProject.bin (depth 5).")
    max_archive_members: int = setting(
        1000,
        "Most archive members inspected for one file, counted over all nested archives together. "
        "Each member costs a libmagic call and a YARA scan (about 1 ms with a large rule set).")
    max_expanded_bytes: int = setting(
        200 * MiB,
        "Most bytes decompressed for one file, over all nested archives together. Decompression is "
        "streamed with this cap, so a zip bomb never holds more than this in memory.")
    max_compression_ratio: int = setting(
        200,
        "Largest expansion ratio (uncompressed / compressed) accepted for a compressed member, checked "
        "once the member has expanded past 1 MiB. Text compresses about 10:1; 200:1 is only reached by "
        "degenerate content such as the runs of zeros zip bombs are made of.")
    max_zip_entries: int = setting(
        65535,
        "Most entries a zip's central directory may list (its end record says how many) for it to be read: "
        "each entry parsed takes about half a KiB, and a zip64 directory can claim millions in a small file. "
        "More is LIMIT_HIT, and the zip is unscannable; 65535 is the most a zip without zip64 can hold.")
    max_pdf_streams: int = setting(
        20000,
        "Most streams of one PDF that are looked at (decoded or skipped): each costs a few small objects, and a "
        "small PDF can hold millions of empty streams. More is LIMIT_HIT, and the PDF is unscannable; real "
        "documents have hundreds to a few thousand.")
    scan_timeout: int = setting(
        10,
        "Seconds one YARA scan of one buffer may take (yara's own timeout, whole seconds); a scan that "
        "runs out is UNSCANNABLE timeout. Typical scans take milliseconds; a pathological rule set can "
        "take tens of seconds on a single file.")
    magic_bytes: int = setting(
        8 * KiB,
        "How many leading bytes libmagic reads to find the true type. 8 KiB gave the same answer as the "
        "whole file on all 1,910 files of the research corpus; 2 KiB mislabelled text subtypes.")
