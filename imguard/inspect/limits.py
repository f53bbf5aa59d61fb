"""The limits of one inspection: every bound on work or memory that hostile content could push."""

from __future__ import annotations

from dataclasses import dataclass

from imguard.inspect.clamav import ClamavSettings
from imguard.inspect.icap import IcapSettings
from imguard.settings import KiB, MiB, setting


@dataclass(frozen=True)
class InspectLimits(ClamavSettings, IcapSettings):
    """Inspection limits (file size, archive walking, YARA time, the ClamAV and ICAP engines)"""

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
    zip_passwords: str = setting(
        "infected",
        "Passwords tried on every encrypted zip (ZipCrypto and AES), 7z and RAR, comma separated, before those of the "
        "conversation: 'infected' is how malware researchers and many vendors exchange samples. A member "
        "opened is inspected like any other; one that none opens stays unscannable (encrypted). '' = none.")
    zip_password_window: float = setting(
        120.0,
        "Seconds before an encrypted zip in which the short messages of the same conversation (both "
        "directions) are tried as its password; the event records which message held it (its archive id), "
        "never the password. 0 = the conversation is not looked at (only zip_passwords).")
    zip_password_wait: float = setting(
        10.0,
        "Seconds an encrypted zip that no password opened is held for the next messages of its conversation "
        "(the password usually follows the file), each tried as it comes. It holds an inspection worker, so "
        "keep it well under inspect_timeout; 0 = no wait. Only where messages arrive on another thread than the "
        "file's inspection (the gateway): the replay and `imguard scan` do not wait.")
    zip_password_tries: int = setting(
        64,
        "Most passwords tried on one encrypted zip (the list first, then the conversation's: every candidate of the "
        "window, those whose message opened a member first, then the newest); each wrong one costs a read of the "
        "zip's first locked entry, milliseconds for AES.")
    archive_tool_timeout: float = setting(
        20.0,
        "Seconds one run of an external archive tool may take (7zz for encrypted 7z, lsar/unar for encrypted RAR; "
        "inspect/encrypted.py): it is killed then, and what it had not read stays unscannable. Each password "
        "tried is one run; its CPU time is capped to the same (prlimit).")
    archive_tool_memory: int = setting(
        1024 * MiB,
        "Address space an external archive tool (7zz, lsar, unar) may map, in bytes (prlimit --as): a 7z that "
        "asks for a bigger dictionary fails and stays unscannable. 7-Zip's own -mx9 needs about 70 MiB to decode.")
    verdict_cache_entries: int = setting(
        10000,
        "Inspection reports kept in the verdict cache (imguard/inspect/cache.py), keyed by the file's SHA-256, its "
        "name and claimed type and the versions of the engines and signatures in force: a file sent again is not "
        "scanned again (policy still decides, and records, each transfer). Concurrent transfers of one file wait "
        "for one scan. Emptied when the signatures reload; 0 turns the cache off.")
    verdict_cache_bytes: int = setting(
        64 * MiB,
        "Memory the verdict cache may hold, counted as the size of the stored (pickled) reports: a few KiB for a "
        "plain file, more for an archive with many members. The least recently used reports go first.")
    verdict_cache_recheck_seconds: float = setting(
        60.0,
        "How often the verdict cache asks the external engines whether their signatures changed (clamd's VERSION, "
        "which names its database version, after a freshclam update; an ICAP service's ISTag, RFC 3507 4.7): a "
        "change empties the cache, so no verdict of the old database is reused. 0 = never ask (a reload still "
        "empties it).")
    magic_bytes: int = setting(
        8 * KiB,
        "How many leading bytes libmagic reads to find the true type. 8 KiB gave the same answer as the "
        "whole file on all 1,910 files of the research corpus; 2 KiB mislabelled text subtypes.")
